"""The engine: runs sequences on one loaded model, one llama_batch per step.

Sequences join and leave between steps. Each step the scheduler (`scheduler.py`, plain data) plans which
tokens of which sequences go into the batch and what KV to copy, save or restore first; the executor
(`executor.py`) does it on llama.cpp; then this class samples, turns tokens into text (UTF-8 safe, with stop
strings held back) and tells the scheduler what was sampled and what finished.

The KV of a finished sequence stays in its slot, and in host RAM once the slot is reused: the next sequence
that starts with the same tokens (the next turn of a chat) prefills only the rest. Several completions of one
prompt (n > 1) prefill it once; the others copy its KV.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator

from ember.engine.executor import Executor
from ember.engine.kv_disk import DiskCache
from ember.engine.llamacpp import LlamaContext, LlamaModel
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import DoneReason, Phase, SampledLogprob, Sequence, SequenceRequest, SequenceUpdate
from ember.engine.step_costs import StepCosts
from ember.errors import ContextOverflowError, EmberError, InvalidRequestError
from ember.options import LoadOptions, SamplingOptions

log = logging.getLogger(__name__)


class Engine:
    """Runs sequences on one loaded model. Not thread-safe: one caller drives `step` at a time.

    `deterministic`: prefill in exact chunks, so a temp-0 answer does not depend on what was cached (see
    `scheduler.py`). `host_cache_bytes`: the budget of the host-RAM KV tier (0 disables it).
    """

    def __init__(
        self,
        model: LlamaModel,
        options: LoadOptions,
        *,
        deterministic: bool = False,
        host_cache_bytes: int = 0,
        disk_cache: DiskCache | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.num_ctx = options.num_ctx
        self.costs = StepCosts()
        self.executor = Executor(model, options, self.costs, disk_cache)
        self.scheduler = Scheduler(
            slots=options.num_parallel,
            batch_capacity=self.executor.batch.capacity,
            num_ctx=options.num_ctx,
            deterministic=deterministic,
            host_budget=host_cache_bytes,
            costs=self.costs,
        )
        self._finished: list[SequenceUpdate] = []  # produced outside step(), returned by the next step()
        self._mailboxes: dict[int, deque[SequenceUpdate]] = {}
        if disk_cache is not None:
            for entry in disk_cache.entries(self.num_ctx):
                self.executor.index_disk(self.scheduler.host.add_disk(entry.tokens, entry.size), entry)

    @property
    def context(self) -> LlamaContext:
        return self.executor.context

    @property
    def deterministic(self) -> bool:
        return self.scheduler.deterministic

    # --- admission -----------------------------------------------------------------------------------

    def submit(self, request: SequenceRequest) -> Sequence:
        """Queue a sequence; it starts when a slot is free. Raises if it can never run."""
        self._validate(request)
        sequence = Sequence(request)
        self.executor.add_sampler(sequence)
        self.scheduler.add(sequence)
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
        family = [parent, *parent.forks]
        try:
            for sequence in family:
                self.executor.add_sampler(sequence)
        except BaseException:
            for sequence in family:
                self.executor.release(sequence)
            raise
        self.scheduler.add(parent)
        return family

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
        """Stop a sequence; it ends at once if it is waiting, else at the start of the next step."""
        if self.scheduler.cancel(sequence):
            self._finished.append(self._ended(sequence, ""))

    def has_work(self) -> bool:
        return bool(self._finished) or self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        """Decode one batch for all running sequences; return what changed."""
        updates, self._finished = self._finished, []
        plan = self.scheduler.schedule()
        updates.extend(self._ended(sequence, "") for sequence in plan.cancelled)
        now = time.perf_counter_ns()
        for sequence in plan.started:
            sequence.started_ns = now
        saved, failed = self.executor.prepare(plan)
        for entry, size in saved.items():
            self.scheduler.host.saved(entry, size)
        for sequence in failed:
            self.scheduler.setup_failed(plan, sequence)
        if not plan.rows:
            return updates
        try:
            indexes = self.executor.decode(plan)
        except EmberError as error:
            log.error("decode failed for %d sequences: %s", len(plan.rows), error)
            for rows in plan.rows:
                rows.sequence.error = str(error)
                self.scheduler.finish(rows.sequence, DoneReason.ERROR)
                updates.append(self._ended(rows.sequence, ""))
            return updates
        now = time.perf_counter_ns()
        sampled: dict[Sequence, int] = {}
        finished: dict[Sequence, DoneReason] = {}
        results: list[tuple[Sequence, str, int | None, SampledLogprob | None]] = []
        for rows in plan.rows:
            if not rows.sample:
                continue
            sequence, index = rows.sequence, indexes[rows.sequence]
            n_past = rows.start + len(rows.tokens)
            family = [sequence]
            if sequence.phase is Phase.PREFILL:  # its prompt is in: it and the forks waiting for it sample
                family += [fork for fork in sequence.forks if fork.phase is Phase.FORKED]
                for member in family:
                    member.prefilled_ns = now
            for member in family:
                token, text, logprob, reason = self._after_logits(member, index, n_past)
                if token is not None:
                    sampled[member] = token
                if reason is not None:
                    finished[member] = reason
                results.append((member, text, token, logprob))
        self.scheduler.update(plan, sampled, finished)
        for sequence, text, token, logprob in results:
            if sequence.done:
                updates.append(self._ended(sequence, text, token, logprob))
            else:
                updates.append(SequenceUpdate(sequence, text, token, False, logprob))
        return updates

    def _after_logits(
        self, sequence: Sequence, index: int, n_past: int
    ) -> tuple[int | None, str, SampledLogprob | None, DoneReason | None]:
        """Sample the sequence's next token from row `index`: (token, text, logprob, reason it ended or None)."""
        request = sequence.request
        if len(sequence.output_tokens) >= request.max_new_tokens or n_past >= self.num_ctx:
            return None, self._drain(sequence), None, DoneReason.LENGTH
        token = self.executor.sample(sequence, index)
        if self.model.is_end_of_generation(token):
            return token, self._drain(sequence), None, DoneReason.STOP
        logprob = None if request.logprobs is None else self.executor.logprob(index, token, request.logprobs)
        text, stopped = sequence.stopper.push(sequence.decoder.decode(self.model.piece(token)))
        if stopped:
            return token, text, logprob, DoneReason.STOP
        if len(sequence.output_tokens) + 1 >= request.max_new_tokens or n_past >= self.num_ctx:
            return token, text + self._drain(sequence), logprob, DoneReason.LENGTH
        return token, text, logprob, None

    def _drain(self, sequence: Sequence) -> str:
        """Text held back for a possible stop string or an unfinished character, at the end of a sequence."""
        tail, stopped = sequence.stopper.push(sequence.decoder.flush())
        return tail if stopped else tail + sequence.stopper.flush()

    def _ended(
        self, sequence: Sequence, text: str, token: int | None = None, logprob: SampledLogprob | None = None
    ) -> SequenceUpdate:
        """The last update of a sequence the scheduler has finished; frees its sampler."""
        sequence.finished_ns = time.perf_counter_ns()
        self.executor.release(sequence)
        return SequenceUpdate(sequence, text, token, True, logprob)

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
        """Drop the KV kept from finished sequences: free slots and host RAM."""
        for slot in self.scheduler.forget_free_slots():
            self.executor.forget(slot)
        self.scheduler.host.take_drops()
        self.executor.drop_host()

    def close(self) -> None:
        while self.scheduler.waiting:  # cancelling a waiting parent puts its forks back in the queue, alone
            self.cancel(self.scheduler.waiting[0])
        for sequence in list(self.scheduler.running):
            self.cancel(sequence)
        self.step()  # ends the cancelled sequences and frees their samplers
        self._spill()
        self.executor.close()

    def _spill(self) -> None:
        """Keep what the slots and host RAM hold on the disk tier (if it is on), most recently used first."""
        if self.executor.disk is None or not self.executor.disk.enabled:
            return
        ranked: list[tuple[int, str, int, list[int]]] = []  # (last used, kind, slot or entry id, tokens)
        for slot in self.scheduler.slots:
            if slot.owner is None and slot.tokens:
                ranked.append((slot.last_used, "slot", slot.index, slot.tokens))
        for entry in self.scheduler.host.entries.values():
            if not entry.on_disk:
                ranked.append((entry.last_used, "host", entry.id, entry.tokens))
        ranked.sort(key=lambda item: item[0], reverse=True)
        started = time.perf_counter()
        try:
            written = self.executor.spill([(kind, index, tokens) for _, kind, index, tokens in ranked])
        except EmberError as error:  # the model still closes
            log.warning("could not keep the KV cache on disk: %s", error)
            return
        if written:
            log.info("kept %d KV entries on disk in %.2f s", written, time.perf_counter() - started)
