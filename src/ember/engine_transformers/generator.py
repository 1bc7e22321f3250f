"""A Hugging Face model loaded with transformers, and the step loop that answers requests in static batches.

A batch starts with the requests waiting at that moment (up to num_parallel): their prompts are left-padded
into one prefill, then every step decodes one token for every row at once, each row sampled with its own
options (transformers' logits processors, one chain per row). Requests that arrive meanwhile wait for the
next batch. A finished or cancelled row rides along until its batch ends (padding costs less than rebuilding
the KV cache of the others), and its text is no longer read.

Text streams through a UTF-8-safe detokenizer that also holds back what may still become a stop string; a
stop string ends the answer and is not part of it, as in the llama.cpp engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ember.engine_transformers import import_transformers
from ember.engine_transformers.json_format import JsonConstraint, JsonFormats
from ember.errors import ContextOverflowError, InvalidRequestError, ModelLoadError
from ember.options import LoadOptions, SamplingOptions
from ember.store.model_directory import read_model_directory
from ember.store.resolve import ModelSource

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_TRUNCATE_ROOM = 256  # tokens left for the answer when an over-long prompt is truncated


def choose_device(options: LoadOptions, torch: Any) -> str:
    """The load's device_map: the option when set, else CUDA when there is one (num_gpu 0 keeps the CPU)."""
    if options.device_map:
        return options.device_map
    if options.num_gpu != 0 and torch.cuda.is_available():
        return "auto"
    return "cpu"


class HFModel:
    """One model directory loaded with AutoModelForCausalLM and its tokenizer."""

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        started = time.perf_counter_ns()
        self.torch, transformers = import_transformers()
        self.source = source
        self.options = options
        self.directory = read_model_directory(source.path)
        if options.num_thread:
            self.torch.set_num_threads(options.num_thread)
        self.device_map = choose_device(options, self.torch)
        dtype = options.dtype or "auto"
        transformers.utils.logging.disable_progress_bar()  # a runner's stderr is the server's log
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, device_map=self.device_map
            )
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise ModelLoadError(f"transformers cannot load {source.name}: {error}") from None
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.json_formats = JsonFormats(self.tokenizer, self.eos_ids, self.vocab_size)
        self.load_duration_ns = time.perf_counter_ns() - started

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        if not ids:
            raise ModelLoadError(f"{self.source.name} names no end-of-sequence token (eos_token_id)")
        return ids

    @property
    def template(self) -> str | None:
        return self.source.template or self.tokenizer.chat_template

    def render(self, conversation: list[dict[str, Any]], template: str | None = None) -> str:
        """The prompt text of a conversation through the model's chat template (or the request's)."""
        chosen = template or self.template
        if not chosen:
            raise InvalidRequestError(f"{self.source.name} has no chat template; send a raw prompt (raw=true)")
        try:
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=chosen, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # a template error is the template's: a 400, not a crash
            raise InvalidRequestError(f"the chat template failed: {type(error).__name__}: {error}") from None

    def tokenize(self, text: str, *, specials: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=specials)["input_ids"])

    def fit(self, tokens: list[int], *, truncate: bool) -> list[int]:
        """The prompt within num_ctx, leaving room to answer; truncated from the start when allowed."""
        limit = self.options.num_ctx - 1
        if len(tokens) <= limit:
            return tokens
        if not truncate:
            raise ContextOverflowError(len(tokens), self.options.num_ctx)
        return tokens[-max(1, self.options.num_ctx - min(_TRUNCATE_ROOM, self.options.num_ctx // 2)) :]

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def close(self) -> None:
        del self.model
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


@dataclass
class GenJob:
    """One completion: its prompt, options and output so far."""

    request_id: str
    index: int
    prompt: list[int]
    sampling: SamplingOptions
    max_new: int
    constraint: JsonConstraint | None = None
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    text: str = ""  # the answer's text so far (stop string cut off)
    sent: int = 0  # characters of `text` already streamed
    done_reason: str | None = None
    stop_sequence: str | None = None
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    generator: Any = None  # torch.Generator of a seeded, sampled row

    @property
    def done(self) -> bool:
        return self.done_reason is not None


@dataclass(frozen=True)
class Update:
    job: GenJob
    text: str  # new text to stream (may be "")
    done: bool


class Batcher:
    """Static batches over one HFModel; `step()` advances the running batch by one token."""

    def __init__(self, hf: HFModel, max_batch: int) -> None:
        self.hf = hf
        self.torch = hf.torch
        self.max_batch = max(1, max_batch)
        self.waiting: deque[GenJob] = deque()
        self.rows: list[GenJob] = []
        self._cache: Any = None
        self._mask: Any = None
        self._positions: Any = None
        self._last: Any = None

    def submit(self, job: GenJob) -> None:
        if job.sampling.seed >= 0 and job.sampling.temperature > 0:
            job.generator = self.torch.Generator(device=self.hf.device).manual_seed(job.sampling.seed)
        self.waiting.append(job)

    def cancel(self, request_id: str) -> None:
        self.waiting = deque(job for job in self.waiting if job.request_id != request_id)
        for job in self.rows:
            if job.request_id == request_id and not job.done:
                job.done_reason = "cancel"

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not job.done for job in self.rows)

    def starts_batch(self) -> bool:
        """The next step prefills a new batch (none is running, and requests wait)."""
        return bool(self.waiting) and not any(not job.done for job in self.rows)

    def kv_tokens(self) -> int:
        return sum(len(job.prompt) + len(job.output) for job in self.rows if not job.done)

    def step(self) -> list[Update]:
        if not any(not job.done for job in self.rows):
            self._end_batch()
            if not self.waiting:
                return []
            return self._prefill()
        return self._decode()

    def _end_batch(self) -> None:
        self.rows, self._cache, self._mask, self._positions, self._last = [], None, None, None, None

    def _prefill(self) -> list[Update]:
        torch = self.torch
        while self.waiting and len(self.rows) < self.max_batch:
            self.rows.append(self.waiting.popleft())
        width = max(len(job.prompt) for job in self.rows)
        ids = torch.full((len(self.rows), width), self.hf.pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for row, job in enumerate(self.rows):  # left padding: every row's last prompt token is the last column
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt, dtype=torch.long)
            mask[row, width - len(job.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        started = time.perf_counter_ns()
        logits = self._forward(ids, mask, positions)
        elapsed = time.perf_counter_ns() - started
        for job in self.rows:
            job.prompt_eval_ns = elapsed
        self._mask, self._positions = mask.to(self.hf.device), positions[:, -1:].to(self.hf.device)
        return self._sample(logits, timed=0)

    def _decode(self) -> list[Update]:
        torch = self.torch
        ones = torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=-1)
        self._positions = self._positions + 1
        started = time.perf_counter_ns()
        logits = self._forward(self._last, self._mask, self._positions)
        return self._sample(logits, timed=time.perf_counter_ns() - started)

    def _forward(self, ids: Any, mask: Any, positions: Any) -> Any:
        device = self.hf.device
        with self.torch.inference_mode():
            if self._cache is None:
                from transformers import DynamicCache

                self._cache = DynamicCache()
            out = self.hf.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=self._cache,
                use_cache=True,
            )
        return out.logits[:, -1, :].float()

    def _sample(self, logits: Any, *, timed: int) -> list[Update]:
        from ember.engine_transformers.sampling import sample_token

        torch = self.torch
        chosen: list[int] = []
        updates: list[Update] = []
        for row, job in enumerate(self.rows):
            if job.done:
                chosen.append(self.hf.pad_id)
                continue
            job.eval_ns += timed
            context = job.prompt + job.output
            token = sample_token(logits[row : row + 1], context, job, self.torch)
            chosen.append(token)
            updates.append(self._accept(job, token))
        self._last = torch.tensor(chosen, dtype=torch.long).view(-1, 1)
        return updates

    def _accept(self, job: GenJob, token: int) -> Update:
        """Add a sampled token to a job: its new text (held back where it may be a stop string or half a
        character), and whether the job ended (end of sequence, a stop string, the length, a finished JSON)."""
        if job.constraint is not None:
            job.constraint.advance(token)
        if token in self.hf.eos_ids:
            job.done_reason = "stop"
        else:
            job.output.append(token)
            if len(job.output) >= job.max_new:
                job.done_reason = "length"
            elif job.constraint is not None and job.constraint.finished:
                job.done_reason = "stop"
        text = self.hf.detokenize(job.output)
        stops = job.sampling.stop
        found = [(text.find(stop), stop) for stop in stops if stop in text]
        if found:
            at, stop = min(found)
            text, job.done_reason, job.stop_sequence = text[:at], "stop", stop
        job.text = text
        safe = len(text)
        if not job.done:
            while safe and text[safe - 1] == "\ufffd":  # half a character: its other bytes come next
                safe -= 1
            safe -= _held_for_stop(text[:safe], stops)
        new, job.sent = text[job.sent : max(safe, job.sent)], max(safe, job.sent)
        return Update(job, new, job.done)


def _held_for_stop(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of a stop string."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-size:]):
                held = size
                break
    return held
