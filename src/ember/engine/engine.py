"""The step loop: every step decodes one llama_batch holding tokens of all running sequences.

Sequences join and leave between steps. Each step first gives every generating sequence its one token,
then fills what is left of the token budget (num_batch) with prompt chunks, so a long prompt never stalls
the streams already generating. Each sequence has its own KV stream (slot), sampler chain, UTF-8 decoder
and stop matcher.

The KV of a finished sequence stays in its slot: a new sequence is given the free slot whose cached tokens share
the longest prefix with its prompt, and prefills only the rest (the next turn of a chat). Several completions
of one prompt (n > 1) prefill it once; the others copy its KV when it is done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator

from ember.engine.llamacpp import LlamaContext, LlamaModel, Sampler, TokenBatch, supports_gpu_offload
from ember.engine.readout import sampled_logprob
from ember.engine.sequence import DoneReason, Phase, SampledLogprob, Sequence, SequenceRequest, SequenceUpdate
from ember.errors import ContextOverflowError, EmberError, InvalidRequestError
from ember.options import LoadOptions, SamplingOptions

log = logging.getLogger(__name__)

EXACT_CHUNK = 48  # prompt tokens per sequence per step on the CPU; see Engine.__init__


class Engine:
    """Runs sequences on one loaded model. Not thread-safe: one caller drives `step` at a time."""

    def __init__(self, model: LlamaModel, options: LoadOptions) -> None:
        self.model = model
        self.options = options
        self.num_ctx = options.num_ctx
        self.context = LlamaContext(model, options)
        self.batch = TokenBatch(max(options.num_batch, options.num_parallel))
        self._free_slots = list(range(options.num_parallel))
        self.prefix_reuse = True
        # On the CPU, llama.cpp computes a batch of fewer than 64 tokens exactly as it computes them one at a time
        # (larger batches take another matrix kernel, with other rounding). Prefilling in chunks below that size
        # makes every token's KV independent of how the prompt was split, so reusing a cached prefix, or
        # prefilling next to other sequences, gives the same text as a fresh run; it also keeps the steps of
        # streams already decoding short. On a GPU, throughput matters more: whole num_batch chunks.
        self.prefill_chunk = options.num_batch if model.gpu_layers > 0 and supports_gpu_offload() else EXACT_CHUNK
        self._slot_tokens: list[list[int]] = [[] for _ in range(options.num_parallel)]  # what each slot's KV holds
        self._slot_used: list[int] = [0] * options.num_parallel  # when each slot was last taken, for LRU
        self._admissions = 0
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._finished: list[SequenceUpdate] = []  # produced outside step(), returned by the next step()
        self._mailboxes: dict[int, deque[SequenceUpdate]] = {}

    # --- admission -----------------------------------------------------------------------------------

    def submit(self, request: SequenceRequest) -> Sequence:
        """Queue a sequence; it starts when a slot is free. Raises if it can never fit."""
        self._validate(request)
        sequence = Sequence(request)
        self._waiting.append(sequence)
        return sequence

    def submit_forks(self, request: SequenceRequest, samplings: list[SamplingOptions]) -> list[Sequence]:
        """Several completions of one prompt: the prompt is prefilled once and its KV copied to the others.

        The first sequence uses `request.sampling`, each other one its own entry of `samplings`.
        """
        self._validate(request)
        if 1 + len(samplings) > self.options.num_parallel:
            raise InvalidRequestError(
                f"{1 + len(samplings)} completions need as many parallel slots, but the model is loaded with "
                f"num_parallel={self.options.num_parallel}; ask for fewer or load it with more"
            )
        parent = Sequence(request)
        for sampling in samplings:
            parent.forks.append(Sequence(dataclasses.replace(request, sampling=sampling), parent=parent))
        self._waiting.append(parent)
        return [parent, *parent.forks]

    def _validate(self, request: SequenceRequest) -> None:
        prompt_length = len(request.prompt_tokens)
        if prompt_length == 0:
            raise InvalidRequestError("the prompt is empty after tokenizing; give at least one token")
        if prompt_length >= self.num_ctx:
            raise ContextOverflowError(prompt_length, self.num_ctx)
        if request.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        for token in request.prompt_tokens:
            self.model.validate_token(token)
        for token in request.sampling.logit_bias or ():
            if token >= self.model.n_vocab:
                raise InvalidRequestError(
                    f"logit_bias names token id {token}, outside the vocabulary (0..{self.model.n_vocab - 1})"
                )
        if request.logprobs is not None and request.logprobs < 0:
            raise InvalidRequestError(f"logprobs must be >= 0, got {request.logprobs}")

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence; its slot is freed at once if it is waiting, else at the start of the next step."""
        if sequence.done:
            return
        if sequence.phase is Phase.WAITING:
            if sequence.parent is not None:
                sequence.parent.forks.remove(sequence)
            else:
                self._waiting.remove(sequence)
                for fork in sequence.forks:  # the copies cannot start without the prompt
                    fork.parent = None
                    self._waiting.appendleft(fork)
                sequence.forks = []
            self._finished.append(self._finish(sequence, DoneReason.CANCELLED, ""))
        else:
            sequence.cancel_requested = True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._finished)

    @property
    def running(self) -> list[Sequence]:
        return list(self._running)

    def _admit(self) -> None:
        while self._waiting and len(self._free_slots) >= 1 + len(self._waiting[0].forks):
            sequence = self._waiting.popleft()
            self._start(sequence, self._take_slot(sequence.prompt_tokens))
            for fork in sequence.forks:
                self._start(fork, self._take_slot([]))

    def _take_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose cached KV shares the longest prefix with `prompt`; without one, a slot next to
        those in use (llama.cpp decodes only consecutive sequence ids in one pass: a gap costs a second pass),
        then the least recently used."""
        in_use = {sequence.slot for sequence in self._running if sequence.slot >= 0}

        def preference(slot: int) -> tuple[int, int, int]:
            common = _common_prefix(self._slot_tokens[slot], prompt) if self.prefix_reuse else 0
            useful = common if common > 1 else 0  # a shared BOS alone is not worth a gap
            adjacent = not in_use or (slot - 1) in in_use or (slot + 1) in in_use
            return (-useful, 0 if adjacent else 1, self._slot_used[slot])

        best_slot = min(self._free_slots, key=preference)
        best_common = _common_prefix(self._slot_tokens[best_slot], prompt) if self.prefix_reuse else 0
        self._free_slots.remove(best_slot)
        self._admissions += 1
        self._slot_used[best_slot] = self._admissions
        # At least the last prompt token is decoded again: its logits give the first new token.
        return best_slot, max(0, min(best_common, len(prompt) - 1))

    def _start(self, sequence: Sequence, slot_and_cached: tuple[int, int]) -> None:
        sequence.slot, cached = slot_and_cached
        self.context.forget(sequence.slot, cached if cached > 0 else -1)
        self._slot_tokens[sequence.slot] = self._slot_tokens[sequence.slot][:cached]
        sequence.n_past = sequence.cached_tokens = cached
        sequence.started_ns = time.perf_counter_ns()
        try:
            sequence.sampler = Sampler(
                self.model, sequence.request.sampling, num_ctx=self.num_ctx, grammar=sequence.request.grammar
            )
        except EmberError as error:
            self._finished.append(self._fail(sequence, str(error)))
            return
        sequence.sampler.remember(sequence.prompt_tokens)
        sequence.phase = Phase.FORKED if sequence.parent is not None else Phase.PREFILL
        self._running.append(sequence)

    # --- the step ------------------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        """Decode one batch for all running sequences; return what changed."""
        updates, self._finished = self._finished, []
        for sequence in [s for s in self._running if s.cancel_requested]:
            updates.append(self._finish(sequence, DoneReason.CANCELLED, ""))
        self._admit()
        updates.extend(self._finished)
        self._finished = []
        if not self._running:
            return updates

        batch = self.batch
        batch.clear()
        budget = batch.capacity
        sampling_rows: list[tuple[Sequence, int]] = []
        advances: list[tuple[Sequence, int]] = []
        # Every generating sequence gets its token first; prompts share what is left of the budget. Entries go
        # in slot order: llama.cpp decodes only consecutive sequence ids in one pass (see _take_slot).
        self._running.sort(key=lambda sequence: sequence.slot)
        budget -= sum(1 for sequence in self._running if sequence.phase is Phase.DECODE)
        for sequence in self._running:
            if sequence.phase is Phase.DECODE:
                index = batch.add(sequence.next_token, sequence.n_past, sequence.slot, True)
                sampling_rows.append((sequence, index))
                advances.append((sequence, 1))
            elif sequence.phase is Phase.PREFILL and budget > 0:
                prompt = sequence.prompt_tokens
                chunk = prompt[sequence.n_past : sequence.n_past + min(budget, self.prefill_chunk)]
                last = len(prompt) - 1
                for offset, token in enumerate(chunk):
                    position = sequence.n_past + offset
                    index = batch.add(token, position, sequence.slot, position == last)
                if sequence.n_past + len(chunk) == len(prompt):
                    sampling_rows.append((sequence, index))
                advances.append((sequence, len(chunk)))
                budget -= len(chunk)

        try:
            self.context.decode(batch)
        except EmberError as error:
            log.error("decode failed for %d sequences: %s", len(advances), error)
            for sequence, _ in advances:
                updates.append(self._fail(sequence, str(error)))
            return updates

        now = time.perf_counter_ns()
        for sequence, count in advances:
            sequence.n_past += count
        for sequence, index in sampling_rows:
            if sequence.phase is Phase.PREFILL:
                sequence.prefilled_ns = now
                sequence.phase = Phase.DECODE
                for fork in [f for f in sequence.forks if f.phase is Phase.FORKED]:
                    self._copy_prompt(sequence, fork, now)
                    updates.append(self._after_logits(fork, index))  # samples from the parent's logits
            updates.append(self._after_logits(sequence, index))
        return updates

    def _copy_prompt(self, parent: Sequence, fork: Sequence, now: int) -> None:
        # Each slot is its own KV stream: llama.cpp copies a whole stream, which holds just the prompt now.
        self.context.copy_sequence(parent.slot, fork.slot)
        fork.n_past = parent.n_past
        fork.cached_tokens = parent.n_past
        fork.prefilled_ns = now
        fork.phase = Phase.DECODE

    def _after_logits(self, sequence: Sequence, index: int) -> SequenceUpdate:
        request = sequence.request
        if len(sequence.output_tokens) >= request.max_new_tokens or sequence.n_past >= self.num_ctx:
            return self._finish(sequence, DoneReason.LENGTH, self._drain(sequence))
        assert sequence.sampler is not None
        token = sequence.sampler.sample(self.context, index)
        sequence.output_tokens.append(token)
        if self.model.is_end_of_generation(token):
            return self._finish(sequence, DoneReason.STOP, self._drain(sequence), token)
        logprob = None if request.logprobs is None else sampled_logprob(self.context, index, token, request.logprobs)
        text, stopped = sequence.stopper.push(sequence.decoder.decode(self.model.piece(token)))
        if stopped:
            return self._finish(sequence, DoneReason.STOP, text, token, logprob)
        if len(sequence.output_tokens) >= request.max_new_tokens or sequence.n_past >= self.num_ctx:
            return self._finish(sequence, DoneReason.LENGTH, text + self._drain(sequence), token, logprob)
        sequence.next_token = token
        return SequenceUpdate(sequence, text, token, False, logprob)

    def _drain(self, sequence: Sequence) -> str:
        """Text held back for a possible stop string or an unfinished character, at the end of a sequence."""
        tail, stopped = sequence.stopper.push(sequence.decoder.flush())
        return tail if stopped else tail + sequence.stopper.flush()

    def _finish(
        self,
        sequence: Sequence,
        reason: DoneReason,
        text: str,
        token: int | None = None,
        logprob: SampledLogprob | None = None,
    ) -> SequenceUpdate:
        forked_only = sequence.phase is Phase.FORKED
        sequence.phase = Phase.DONE
        sequence.done_reason = reason
        sequence.finished_ns = time.perf_counter_ns()
        if sequence in self._running:
            self._running.remove(sequence)
        if sequence.slot >= 0:
            if reason is DoneReason.ERROR or forked_only:
                self.context.forget(sequence.slot)
                self._slot_tokens[sequence.slot] = []
            else:  # kept for the next sequence that starts with the same tokens
                self._slot_tokens[sequence.slot] = sequence.kv_tokens()
            self._free_slots.append(sequence.slot)
            self._free_slots.sort()
            sequence.slot = -1
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        for fork in sequence.forks:  # it ended before its prompt was in: the copies prefill it themselves
            if fork.phase is Phase.FORKED:
                fork.parent = None
                fork.phase = Phase.PREFILL
        return SequenceUpdate(sequence, text, token, True, logprob)

    def _fail(self, sequence: Sequence, message: str) -> SequenceUpdate:
        sequence.error = message
        return self._finish(sequence, DoneReason.ERROR, "")

    # --- driving -------------------------------------------------------------------------------------

    def run(self, sequences: Iterable[Sequence]) -> Iterator[SequenceUpdate]:
        """Step until the given sequences are done, yielding their updates in order.

        Several `run` generators may be interleaved (in one thread, or in several when the caller holds a
        lock around each `next`): a step made by one delivers the others' updates to their mailboxes, so all
        of them advance together in shared batches. Closing the generator early cancels its sequences.
        """
        wanted = list(sequences)
        for sequence in wanted:
            self.watch(sequence)
        remaining = {sequence.id for sequence in wanted}
        try:
            while remaining:
                for sequence in wanted:
                    mailbox = self._mailboxes[sequence.id]
                    while mailbox:
                        update = mailbox.popleft()
                        if update.done:
                            remaining.discard(sequence.id)
                        yield update
                if remaining:
                    self._deliver(self.step())
        finally:
            for sequence in wanted:
                if not sequence.done:
                    self.cancel(sequence)
                self._mailboxes.pop(sequence.id, None)

    def watch(self, sequence: Sequence) -> None:
        """Keep the sequence's updates for a `run` that starts later.

        A caller that submits in one lock hold and starts `run` in another must call this in the first: a step
        made in between by another thread's `run` would otherwise drop the sequence's first updates.
        """
        self._mailboxes.setdefault(sequence.id, deque())

    def _deliver(self, updates: list[SequenceUpdate]) -> None:
        for update in updates:
            mailbox = self._mailboxes.get(update.sequence.id)
            if mailbox is not None:
                mailbox.append(update)

    def forget_cache(self) -> None:
        """Drop the KV kept from finished sequences (free slots only)."""
        for slot in self._free_slots:
            self.context.forget(slot)
            self._slot_tokens[slot] = []

    def close(self) -> None:
        for sequence in list(self._running) + list(self._waiting):
            self.cancel(sequence)
        self.step()  # frees the slots and samplers of cancelled sequences
        self.batch.close()
        self.context.close()


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = min(len(first), len(second))
    for index in range(length):
        if first[index] != second[index]:
            return index
    return length
