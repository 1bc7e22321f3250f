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

from ember.embeddings import Embedder, EmbedJob
from ember.engine.engine import Engine
from ember.engine.llamacpp import LlamaModel
from ember.engine.sequence import DoneReason, Sequence, SequenceRequest, SequenceUpdate
from ember.errors import EngineError, InvalidRequestError
from ember.logprobs import logprob_entries, requested_logprobs
from ember.options import SAMPLING_OPTION_NAMES, LoadOptions, SamplingOptions, sampling_options
from ember.prompt import PromptBuilder, grammar_for_format
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
    to_messages,
)

log = logging.getLogger(__name__)


class LoadedModel:
    """One model file, loaded with fixed LoadOptions."""

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        started = time.perf_counter_ns()
        self.source = source
        self.options = options
        self.info: GGUFInfo = read_gguf(source.path)  # refuse a damaged file before llama.cpp reads it
        self.model = LlamaModel(source.path, options, adapters=source.adapters)
        try:
            self.engine = Engine(self.model, options)
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
        yield from self._answer(self._started(self.start_generate, request))

    def chat(self, request: ChatRequest) -> Iterator[ChatResponse]:
        """Stream the next assistant message; the last chunk has done=True and the timings."""
        yield from self._answer(self._started(self.start_chat, request))

    def _started(self, start: Any, request: Any) -> Any:
        """Submit and watch in one lock hold: another thread's step between the two would drop the sequence's
        first updates (its mailbox is made when its run starts)."""
        with self._lock:
            job = start(request)
            if isinstance(job, Job):
                self.engine.watch(job.sequence)
            return job

    def _answer(self, job: Job | GenerateResponse | ChatResponse) -> Iterator[Any]:
        if not isinstance(job, Job):  # answered at once (a load-only request)
            yield job
            return
        for update in self._run(job.sequence):
            chunk = job.chunk(update)
            if chunk is not None:
                yield chunk

    def start_generate(self, request: GenerateRequest) -> Job | GenerateResponse:
        """Submit a generate request to the engine; a request with nothing to generate gets its answer now."""
        started = time.perf_counter_ns()
        sampling = self.sampling_for(request.options)
        if request.images:
            raise InvalidRequestError(f"model '{self.name}' does not support images; send text only")
        if not request.prompt and not request.context and not request.suffix:
            return GenerateResponse(model=self.name, done=True, done_reason="load", **self._metrics(started))
        thinking = None
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
            thinking = ThinkingParser(opened=prompt_opens_thinking(text)) if think else None
        if request.context:
            tokens = list(request.context) + tokens
        truncate = request.truncate is not False
        tokens = self.prompts.fit(tokens, num_ctx=self.options.num_ctx, sampling=sampling, truncate=truncate)
        grammar = request.grammar or grammar_for_format(request.format)
        sequence = self._submit(tokens, sampling, grammar, requested_logprobs(request))
        return Job(self, "generate", sequence, started, thinking=thinking)

    def start_chat(self, request: ChatRequest) -> Job | ChatResponse:
        """Submit a chat request to the engine; a request with no messages gets its answer now."""
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
        sequence = self._submit(prompt.tokens, sampling, grammar, requested_logprobs(request))
        thinking = ThinkingParser(opened=prompt_opens_thinking(prompt.text)) if think else None
        return Job(
            self, "chat", sequence, started, tool_parser=plan.parser(), thinking=thinking, dropped=prompt.dropped
        )

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

    def run_many(self, prompts: list[list[int]], samplings: list[SamplingOptions]) -> Iterator[SequenceUpdate]:
        """Decode several prompts together, one shared batch per step; updates arrive interleaved."""
        with self._lock:
            sequences = [self._submit(t, sampling, None) for t, sampling in zip(prompts, samplings, strict=True)]
            for sequence in sequences:
                self.engine.watch(sequence)
        yield from self._run(*sequences)

    # --- internals -----------------------------------------------------------------------------------

    def _submit(
        self, tokens: list[int], sampling: SamplingOptions, grammar: str | None, logprobs: int | None = None
    ) -> Sequence:
        room = self.options.num_ctx - len(tokens)
        request = SequenceRequest(tokens, sampling, sampling.max_new_tokens(max(room, 0)), grammar, logprobs)
        with self._lock:
            return self.engine.submit(request)

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
    """One request on the engine: turns the engine's updates for its sequence into response chunks."""

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

    @property
    def parses_text(self) -> bool:
        """Whether the answer's text goes through a parser (so the runner sends chunks, not plain text)."""
        return self.tool_parser is not None or self.thinking is not None

    def chunk(self, update: SequenceUpdate) -> GenerateResponse | ChatResponse | None:
        """The response chunk for an update: text as it comes, then the final chunk with the timings."""
        if update.done and update.sequence.done_reason is DoneReason.ERROR:
            raise EngineError(update.sequence.error or "generation failed")
        if not update.done and not update.text and update.logprob is None:
            return None
        text, thinking, calls = update.text, "", None
        if self.thinking is not None:
            thinking, text = self.thinking.push(text, final=update.done)
        if self.tool_parser is not None:
            text, calls = self.tool_parser.push(text, final=update.done)
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

    def stream_parts(self, update: SequenceUpdate) -> tuple[str, dict[str, Any] | None]:
        """A not-final update of a parsed answer as the runner sends it: plain text, or a chunk with tool calls
        or thinking."""
        chunk = self.chunk(update)
        if chunk is None:
            return "", None
        # Without its logprobs: the runner sends the token's logprob entry with a text event of its own.
        if isinstance(chunk, ChatResponse):
            if chunk.message.tool_calls or chunk.message.thinking:
                return "", chunk.model_dump(exclude={"logprobs"})
            return chunk.message.content, None
        if chunk.thinking:
            return "", chunk.model_dump(exclude={"logprobs"})
        return chunk.response, None


def _done_reason(sequence: Sequence) -> str:
    reason = sequence.done_reason
    return reason.value if reason is not None else DoneReason.STOP.value
