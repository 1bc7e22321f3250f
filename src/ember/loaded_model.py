"""A model loaded in this process, answering native requests through the engine.

The Python API (`ember.Model`) and `ember run` use it directly; runner processes will wrap the same class.
Several threads may call it at once: each holds the lock only for one engine step, so their sequences are
decoded together in shared batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ember.config import Settings
from ember.embeddings import Embedder, EmbedJob
from ember.engine.engine import Engine
from ember.engine.kv_disk import DiskCache, cache_key
from ember.engine.llamacpp import LlamaModel
from ember.engine.sequence import DoneReason, Sequence, SequenceRequest, SequenceUpdate
from ember.errors import EngineError, InvalidRequestError
from ember.logprobs import logprob_entries, requested_logprobs
from ember.options import SAMPLING_OPTION_NAMES, LoadOptions, SamplingOptions, sampling_options
from ember.prompt import PromptBuilder, grammar_for_format
from ember.serve.memory import system_memory
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.resolve import ModelSource
from ember.thinking import ThinkingParser, prompt_opens_thinking, template_thinks
from ember.tools import ToolCallParser, ToolPlan
from ember.types import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    Message,
    ThinkSpec,
    ToolCall,
    parse_priority,
    to_messages,
)

log = logging.getLogger(__name__)
_SEEDS = 2**32 - 1  # llama.cpp's seeds are 0 .. 2**32 - 2 (2**32 - 1 means random)


class LoadedModel:
    """One model file, loaded with fixed LoadOptions."""

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        started = time.perf_counter_ns()
        self.source = source
        self.options = options
        self.info: GGUFInfo = read_gguf(source.path)  # refuse a damaged file before llama.cpp reads it
        self.model = LlamaModel(source.path, options, adapters=source.adapters)
        try:
            configured = Settings()  # read at each load: the environment the model is loaded in
            self.engine = Engine(
                self.model,
                options,
                deterministic=options.deterministic or configured.deterministic,
                host_cache_bytes=host_cache_budget(configured),
                disk_cache=disk_cache_for(source, options, configured),
            )
            self.prompts = PromptBuilder(
                self.model, template=source.template, system=source.system, messages=source.messages
            )
        except BaseException:
            self.model.close()
            raise
        # Re-entrant: a generator abandoned mid-stream may be finalized while this thread holds the lock.
        self._lock = threading.RLock()
        self.load_duration_ns = time.perf_counter_ns() - started
        self._unreported_load_ns = self.load_duration_ns
        self._default_sampling = {k: v for k, v in source.parameters.items() if k in SAMPLING_OPTION_NAMES}
        self._embedder: Embedder | None = None  # its own llama.cpp context, made at the first embed request

    @property
    def name(self) -> str:
        return self.source.name

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
            self.engine.close()
            self.model.close()

    # --- requests ------------------------------------------------------------------------------------

    def sampling_for(self, *layers: Mapping[str, Any] | None) -> SamplingOptions:
        """The model's own parameters under the request's options (load options there must match)."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update({k: v for k, v in (layer or {}).items() if v is not None})
        changed = {k for k, v in merged.items() if k in LoadOptions.model_fields and getattr(self.options, k) != v}
        if changed:
            raise InvalidRequestError(
                f"{', '.join(sorted(changed))} differs from the loaded model's; load the model again with it"
            )
        sampling_layer = {k: v for k, v in merged.items() if k not in LoadOptions.model_fields}
        return sampling_options(self._default_sampling, sampling_layer)

    def generate(self, request: GenerateRequest) -> Iterator[GenerateResponse]:
        """Stream the answer to a generate request; the last chunk has done=True and the timings."""
        for _, chunk in self.generate_choices(request, 1):
            yield chunk

    def chat(self, request: ChatRequest) -> Iterator[ChatResponse]:
        """Stream the next assistant message; the last chunk has done=True and the timings."""
        for _, chunk in self.chat_choices(request, 1):
            yield chunk

    def generate_choices(self, request: GenerateRequest, n: int) -> Iterator[tuple[int, GenerateResponse]]:
        """`n` completions of one prompt (prefilled once), as (choice index, chunk) in the order they come."""
        yield from self._answer(self._started(self.start_generate, request, n), n)

    def chat_choices(self, request: ChatRequest, n: int) -> Iterator[tuple[int, ChatResponse]]:
        """`n` completions of the next assistant message (prefilled once), as (choice index, chunk)."""
        yield from self._answer(self._started(self.start_chat, request, n), n)

    def _started(self, start: Any, request: Any, choices: int) -> Any:
        """Submit and watch in one lock hold: another thread's step between the two would drop the sequences'
        first updates (a sequence's mailbox is made when its run starts)."""
        with self._lock:
            jobs = start(request, choices)
            for job in jobs if isinstance(jobs, list) else ():
                self.engine.watch(job.sequence)
            return jobs

    def _answer(self, jobs: list[Job] | GenerateResponse | ChatResponse, n: int) -> Iterator[tuple[int, Any]]:
        if not isinstance(jobs, list):  # answered at once (a load-only request): the same for every choice
            for index in range(n):
                yield index, jobs
            return
        by_sequence = {job.sequence.id: (index, job) for index, job in enumerate(jobs)}
        for update in self._run(*(job.sequence for job in jobs)):
            index, job = by_sequence[update.sequence.id]
            chunk = job.chunk(update)
            if chunk is not None:
                yield index, chunk

    def start_generate(self, request: GenerateRequest, choices: int = 1) -> list[Job] | GenerateResponse:
        """Submit a generate request to the engine (`choices` completions of it: its prompt is prefilled once);
        a request with nothing to generate gets its answer now."""
        started = time.perf_counter_ns()
        sampling = self.sampling_for(request.options)
        if request.images:
            raise InvalidRequestError(f"model '{self.name}' does not support images; send text only")
        if not request.prompt and not request.context and not request.suffix:
            return GenerateResponse(model=self.name, done=True, done_reason="load", **self._metrics(started))
        opened = None  # for a thinking answer: whether the prompt already opened its thinking part
        if request.suffix:
            fim = self.model.fim_tokens()
            if fim is None:
                raise InvalidRequestError(f'"{request.model or self.name}" does not support insert (no FIM tokens)')
            tokens = self.prompts.insertion_tokens(request.prompt, request.suffix, fim)
        elif request.raw:
            tokens = self.prompts.tokenize_prompt(request.prompt) if request.prompt else []
        else:
            conversation = self.prompts.chat_messages([Message(role="user", content=request.prompt)], request.system)
            think = self._think(request.think, request.template)
            text = self.prompts.render_chat(conversation, template=request.template, think=think)
            tokens = self.prompts.tokenize_prompt(text)
            opened = prompt_opens_thinking(text) if think else None
        if request.context:
            tokens = list(request.context) + tokens
        truncate = request.truncate is not False
        tokens = self.prompts.fit(tokens, num_ctx=self.options.num_ctx, sampling=sampling, truncate=truncate)
        grammar = request.grammar or grammar_for_format(request.format)
        sequences = self._submit_choices(
            tokens, sampling, grammar, requested_logprobs(request), choices, parse_priority(request.priority)
        )
        return [Job(self, "generate", sequence, started, thinking=_thinking_parser(opened)) for sequence in sequences]

    def start_chat(self, request: ChatRequest, choices: int = 1) -> list[Job] | ChatResponse:
        """Submit a chat request to the engine (`choices` completions, prefilled once); a request with no
        messages gets its answer now."""
        started = time.perf_counter_ns()
        sampling = self.sampling_for(request.options)
        messages = to_messages(request.messages)
        if any(message.images for message in messages):
            raise InvalidRequestError(f"model '{self.name}' does not support images; send text only")
        if not messages:
            return ChatResponse(model=self.name, done=True, done_reason="load", **self._metrics(started))
        conversation = self.prompts.chat_messages(messages, None)
        template_source = request.template or self.prompts.template_source
        plan = ToolPlan.for_request(request.tools, request.tool_choice, template_source)
        think = self._think(request.think, request.template)
        prompt = self.prompts.fit_chat(
            plan.conversation(conversation),
            num_ctx=self.options.num_ctx,
            sampling=sampling,
            truncate=request.truncate is not False,
            template=request.template,
            tools=plan.template_tools(),
            think=think,
            continue_final=request.continue_final,
        )
        grammar = plan.grammar() or request.grammar or grammar_for_format(request.format)
        sequences = self._submit_choices(
            prompt.tokens, sampling, grammar, requested_logprobs(request), choices, parse_priority(request.priority)
        )
        opened = prompt_opens_thinking(prompt.text) if think else None
        return [
            Job(
                self,
                "chat",
                sequence,
                started,
                tool_parser=plan.parser(),
                thinking=_thinking_parser(opened),
                dropped=prompt.dropped,
            )
            for sequence in sequences
        ]

    def _think(self, think: ThinkSpec, template: str | None) -> ThinkSpec:
        """The request's `think` where the template thinks at all (a template without thinking tags never
        gets told to think, and its answer is never read for them)."""
        if not template_thinks(template or self.prompts.template_source):
            return None
        return think

    def complete_tokens(
        self, tokens: list[int], sampling: SamplingOptions, grammar: str | None = None, truncate: bool = False
    ) -> Iterator[SequenceUpdate]:
        """Lowest level: stream a raw completion of prompt tokens (used by the llama-cpp-python style call)."""
        tokens = self.prompts.fit(tokens, num_ctx=self.options.num_ctx, sampling=sampling, truncate=truncate)
        with self._lock:
            sequence = self._submit(tokens, sampling, grammar)
            self.engine.watch(sequence)
        yield from self._run(sequence)

    # --- internals -----------------------------------------------------------------------------------

    def _submit(
        self,
        tokens: list[int],
        sampling: SamplingOptions,
        grammar: str | None,
        logprobs: int | None = None,
        priority: int = 1,
    ) -> Sequence:
        room = self.options.num_ctx - len(tokens)
        request = SequenceRequest(tokens, sampling, sampling.max_new_tokens(max(room, 0)), grammar, logprobs, priority)
        with self._lock:
            return self.engine.submit(request)

    def _submit_choices(
        self,
        tokens: list[int],
        sampling: SamplingOptions,
        grammar: str | None,
        logprobs: int | None,
        choices: int,
        priority: int = 1,
    ) -> list[Sequence]:
        """`choices` completions of one prompt. They fork from one prefill when the slots allow it; choice i
        samples with seed + i when a seed is set, as separate requests would."""
        if choices == 1:
            return [self._submit(tokens, sampling, grammar, logprobs, priority)]
        samplings = [
            sampling if sampling.seed < 0 else sampling.model_copy(update={"seed": (sampling.seed + i) % _SEEDS})
            for i in range(choices)
        ]
        if choices > self.options.num_parallel:  # not all at once: one after another, through the prefix cache
            return [self._submit(tokens, each, grammar, logprobs, priority) for each in samplings]
        room = self.options.num_ctx - len(tokens)
        request = SequenceRequest(tokens, sampling, sampling.max_new_tokens(max(room, 0)), grammar, logprobs, priority)
        with self._lock:
            return self.engine.submit_forks(request, samplings[1:])

    def _run(self, *sequences: Sequence) -> Iterator[SequenceUpdate]:
        updates = self.engine.run(sequences)
        try:
            while True:
                with self._lock:
                    update = next(updates, None)
                if update is None:
                    return
                if update.done and update.sequence.done_reason is DoneReason.ERROR:
                    raise EngineError(update.sequence.error or "generation failed")
                yield update
        finally:
            with self._lock:
                updates.close()

    # --- embeddings ----------------------------------------------------------------------------------

    def embed(self, request: EmbedRequest) -> EmbedResponse:
        """The pooled embedding of each input, not normalized (the API routes normalize where Ollama does)."""
        job = self.start_embed(request)
        while not job.done:
            job.step()
        return job.result()

    def start_embed(self, request: EmbedRequest) -> EmbedJob:
        """Tokenize and check every input now (one bad input fails the request); `step()` embeds one each."""
        self.sampling_for(request.options)  # load options there must match the loaded model's
        return EmbedJob(self, request)

    def embed_tokens(self, tokens: list[int]) -> list[float]:
        """One input's pooled embedding; the first call creates the embeddings context."""
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self.model, self.options)
            return self._embedder.embed(tokens)

    def _metrics(self, started_ns: int, sequence: Sequence | None = None) -> dict[str, int]:
        load_ns, self._unreported_load_ns = self._unreported_load_ns, 0
        metrics = {"total_duration": time.perf_counter_ns() - started_ns + load_ns, "load_duration": load_ns}
        if sequence is not None:
            metrics.update(
                prompt_eval_count=sequence.prompt_eval_count,
                prompt_cached_count=sequence.cached_tokens,
                prompt_eval_duration=sequence.prompt_eval_duration_ns,
                eval_count=sequence.eval_count,
                eval_duration=sequence.eval_duration_ns,
            )
        return metrics


class Job:
    """One completion on the engine: turns the engine's updates for its sequence into response chunks (in
    this process), or into the parts the runner sends (`parts`)."""

    def __init__(
        self,
        model: LoadedModel,
        kind: str,
        sequence: Sequence,
        started_ns: int,
        *,
        tool_parser: ToolCallParser | None = None,
        thinking: ThinkingParser | None = None,
        dropped: int = 0,
    ) -> None:
        self.model = model
        self.kind = kind
        self.sequence = sequence
        self.started_ns = started_ns
        self.tool_parser = tool_parser  # a chat with tools: the text goes through it (see ember.tools)
        self.thinking = thinking  # a thinking model: its <think> part is split from the answer first
        self.dropped = dropped  # messages truncation left out

    def chunk(self, update: SequenceUpdate) -> GenerateResponse | ChatResponse | None:
        """The response chunk for an update: text as it comes, then the final chunk with the timings."""
        if update.done and update.sequence.done_reason is DoneReason.ERROR:
            raise EngineError(update.sequence.error or "generation failed")
        if not update.done and not update.text and update.logprob is None:
            return None
        thinking, text, calls = self.parts(update)
        if not update.done and not text and not thinking and not calls and update.logprob is None:
            return None
        name = self.model.name
        logprobs = logprob_entries(self.model.model, update)
        final: dict[str, Any] = {}
        if update.done:
            final = {"done": True, "done_reason": _done_reason(self.sequence), "stop_sequence": self._stop_sequence()}
            final.update(self.model._metrics(self.started_ns, self.sequence))
        if self.kind == "chat":
            message = Message(role="assistant", content=text, thinking=thinking or None, tool_calls=calls or None)
            if update.done and self.dropped:
                final["truncated_messages"] = self.dropped
            return ChatResponse(model=name, message=message, logprobs=logprobs, **final)
        if update.done:
            final["context"] = self.sequence.prompt_tokens + self.sequence.output_tokens
        return GenerateResponse(model=name, response=text, thinking=thinking or None, logprobs=logprobs, **final)

    def _stop_sequence(self) -> str | None:
        """Which stop string ended the answer (None when the model ended it, or the length did). The engine
        keeps the token that completed the string, so the generated text still holds it."""
        sequence, vocabulary = self.sequence, self.model.model
        stops, tokens = sequence.request.sampling.stop, sequence.output_tokens
        if sequence.done_reason is not DoneReason.STOP or not stops or not tokens:
            return None
        if vocabulary.is_end_of_generation(tokens[-1]):
            return None
        text = vocabulary.detokenize(tokens)
        found = [(text.find(stop), stop) for stop in stops if stop in text]
        return min(found)[1] if found else None

    def parts(self, update: SequenceUpdate) -> tuple[str, str, list[ToolCall]]:
        """(thinking, content, tool calls) of an update's text, through the job's parsers; each holds back what
        may still be a tag or a call until it is clear. Text with no parser passes as it is."""
        text, thinking, calls = update.text, "", []
        if self.thinking is not None:
            thinking, text = self.thinking.push(text, final=update.done)
        if self.tool_parser is not None:
            text, calls = self.tool_parser.push(text, final=update.done)
        return thinking, text, calls


def host_cache_budget(configured: Settings) -> int:
    """EMBER_KV_CACHE_RAM, else a quarter of the available memory, at most 8 GiB (llama-server's --cache-ram)."""
    if configured.kv_cache_ram is not None:
        return configured.kv_cache_ram
    return min(8 << 30, system_memory().available // 4)


def disk_cache_for(source: ModelSource, options: LoadOptions, configured: Settings) -> DiskCache | None:
    """The model's disk KV tier (EMBER_KV_CACHE_DISK), or None when it is off."""
    if configured.kv_cache_disk <= 0:
        return None
    key = cache_key(source.path, source.digest, source.adapters, options.flash_attn)
    return DiskCache(configured.home / "kv" / key, configured.kv_cache_disk)


def _thinking_parser(opened: bool | None) -> ThinkingParser | None:
    """A fresh parser for one completion of a thinking answer (None: the answer is not read for thinking)."""
    return None if opened is None else ThinkingParser(opened=opened)


def _done_reason(sequence: Sequence) -> str:
    reason = sequence.done_reason
    return reason.value if reason is not None else DoneReason.STOP.value
