"""The step loop: every step decodes one llama_batch holding tokens of all running sequences.

Sequences join and leave between steps. Each step first gives every generating sequence its one token,
then fills what is left of the token budget (num_batch) with prompt chunks, so a long prompt never stalls
the streams already generating. Each sequence has its own KV stream (slot), sampler chain, UTF-8 decoder
and stop matcher.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator

from ember.engine.llamacpp import LlamaContext, LlamaModel, Sampler, TokenBatch
from ember.engine.sequence import DoneReason, Phase, Sequence, SequenceRequest, SequenceUpdate
from ember.errors import ContextOverflowError, EmberError, InvalidRequestError
from ember.options import LoadOptions

log = logging.getLogger(__name__)


class Engine:
    """Runs sequences on one loaded model. Not thread-safe: one caller drives `step` at a time."""

    def __init__(self, model: LlamaModel, options: LoadOptions) -> None:
        self.model = model
        self.options = options
        self.num_ctx = options.num_ctx
        self.context = LlamaContext(model, options)
        self.batch = TokenBatch(max(options.num_batch, options.num_parallel))
        self._free_slots = list(range(options.num_parallel))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._finished: list[SequenceUpdate] = []  # produced outside step(), returned by the next step()
        self._mailboxes: dict[int, deque[SequenceUpdate]] = {}

    # --- admission -----------------------------------------------------------------------------------

    def submit(self, request: SequenceRequest) -> Sequence:
        """Queue a sequence; it starts when a slot is free. Raises if it can never fit."""
        prompt_length = len(request.prompt_tokens)
        if prompt_length == 0:
            raise InvalidRequestError("the prompt is empty after tokenizing; give at least one token")
        if prompt_length >= self.num_ctx:
            raise ContextOverflowError(prompt_length, self.num_ctx)
        if request.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        for token in request.prompt_tokens:
            self.model.validate_token(token)
        sequence = Sequence(request)
        self._waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence; its slot is freed at once if it is waiting, else at the start of the next step."""
        if sequence.done:
            return
        if sequence.phase is Phase.WAITING:
            self._waiting.remove(sequence)
            self._finished.append(self._finish(sequence, DoneReason.CANCELLED, ""))
        else:
            sequence.cancel_requested = True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._finished)

    @property
    def running(self) -> list[Sequence]:
        return list(self._running)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            sequence = self._waiting.popleft()
            sequence.slot = self._free_slots.pop(0)
            self.context.forget(sequence.slot)
            try:
                sequence.sampler = Sampler(
                    self.model, sequence.request.sampling, num_ctx=self.num_ctx, grammar=sequence.request.grammar
                )
            except EmberError as error:
                self._free_slots.append(sequence.slot)
                self._finished.append(self._fail(sequence, str(error)))
                continue
            sequence.sampler.remember(sequence.prompt_tokens)
            sequence.phase = Phase.PREFILL
            sequence.started_ns = time.perf_counter_ns()
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
        for sequence in self._running:
            if sequence.phase is Phase.DECODE:
                index = batch.add(sequence.next_token, sequence.n_past, sequence.slot, True)
                sampling_rows.append((sequence, index))
                advances.append((sequence, 1))
                budget -= 1
        for sequence in self._running:
            if budget <= 0:
                break
            if sequence.phase is not Phase.PREFILL:
                continue
            prompt = sequence.prompt_tokens
            chunk = prompt[sequence.n_past : sequence.n_past + budget]
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
            updates.append(self._after_logits(sequence, index))
        return updates

    def _after_logits(self, sequence: Sequence, index: int) -> SequenceUpdate:
        request = sequence.request
        if len(sequence.output_tokens) >= request.max_new_tokens or sequence.n_past >= self.num_ctx:
            return self._finish(sequence, DoneReason.LENGTH, self._drain(sequence))
        assert sequence.sampler is not None
        token = sequence.sampler.sample(self.context, index)
        sequence.output_tokens.append(token)
        if self.model.is_end_of_generation(token):
            return self._finish(sequence, DoneReason.STOP, self._drain(sequence), token)
        text, stopped = sequence.stopper.push(sequence.decoder.decode(self.model.piece(token)))
        if stopped:
            return self._finish(sequence, DoneReason.STOP, text, token)
        if len(sequence.output_tokens) >= request.max_new_tokens or sequence.n_past >= self.num_ctx:
            return self._finish(sequence, DoneReason.LENGTH, text + self._drain(sequence), token)
        sequence.next_token = token
        return SequenceUpdate(sequence, text, token, False)

    def _drain(self, sequence: Sequence) -> str:
        """Text held back for a possible stop string or an unfinished character, at the end of a sequence."""
        tail, stopped = sequence.stopper.push(sequence.decoder.flush())
        return tail if stopped else tail + sequence.stopper.flush()

    def _finish(self, sequence: Sequence, reason: DoneReason, text: str, token: int | None = None) -> SequenceUpdate:
        sequence.phase = Phase.DONE
        sequence.done_reason = reason
        sequence.finished_ns = time.perf_counter_ns()
        if sequence in self._running:
            self._running.remove(sequence)
        if sequence.slot >= 0:
            self.context.forget(sequence.slot)
            self._free_slots.append(sequence.slot)
            self._free_slots.sort()
            sequence.slot = -1
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        return SequenceUpdate(sequence, text, token, True)

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
            self._mailboxes[sequence.id] = deque()
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

    def _deliver(self, updates: list[SequenceUpdate]) -> None:
        for update in updates:
            mailbox = self._mailboxes.get(update.sequence.id)
            if mailbox is not None:
                mailbox.append(update)

    def close(self) -> None:
        for sequence in list(self._running) + list(self._waiting):
            self.cancel(sequence)
        self.step()  # frees the slots and samplers of cancelled sequences
        self.batch.close()
        self.context.close()
