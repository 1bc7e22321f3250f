"""The executor: carries out the scheduler's StepPlan on llama.cpp and times what it does.

It owns the context (the KV streams), the reusable batch, each sequence's sampler chain and the bytes of the
host-RAM KV tier (the scheduler keeps only their index). The timings feed `StepCosts`, from which the scheduler
derives its prefill budget and whether a KV copy pays for itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from ember.engine.kv_disk import DiskCache, DiskEntry
from ember.engine.llamacpp import LlamaContext, LlamaModel, TokenBatch
from ember.engine.readout import sampled_logprob
from ember.engine.sampler import Sampler
from ember.engine.scheduler import StepPlan
from ember.engine.sequence import SampledLogprob, Sequence
from ember.engine.step_costs import StepCosts
from ember.options import LoadOptions

log = logging.getLogger(__name__)


class Executor:
    """llama.cpp's side of the engine. Not thread-safe: the engine drives it one step at a time."""

    def __init__(
        self, model: LlamaModel, options: LoadOptions, costs: StepCosts, disk: DiskCache | None = None
    ) -> None:
        self.model = model
        self.disk = disk
        self.num_ctx = options.num_ctx
        self.context = LlamaContext(model, options)
        self.batch = TokenBatch(max(options.num_batch, options.num_parallel))
        self.costs = costs
        self._samplers: dict[int, Sampler] = {}
        self._host: dict[int, bytearray] = {}  # host-RAM KV entries by the scheduler's entry id
        self._disk: dict[int, DiskEntry] = {}  # disk-tier entries by the scheduler's entry id
        self._warm_up()

    def _warm_up(self) -> None:
        """One small decode before the first request, as llama.cpp's own tools do: every weight is read once (an
        mmap'd model pages in here), so the first request's step is not a cold one, and neither are the step
        costs the scheduler learns from it. Not timed; the KV is cleared afterwards."""
        self.batch.clear()
        self.batch.add(0, 0, 0, True)
        self.context.decode(self.batch)
        self.batch.clear()
        self.context.clear()

    @property
    def host_bytes(self) -> int:
        return sum(len(data) for data in self._host.values())

    # --- samplers ----------------------------------------------------------------------------------------

    def add_sampler(self, sequence: Sequence) -> None:
        """Build the sequence's sampler chain (raises InvalidRequestError for a bad grammar)."""
        request = sequence.request
        sampler = Sampler(self.model, request.sampling, num_ctx=self.num_ctx, grammar=request.grammar)
        sampler.remember(sequence.prompt_tokens)
        self._samplers[sequence.id] = sampler

    def sample(self, sequence: Sequence, index: int) -> int:
        return self._samplers[sequence.id].sample(self.context, index)

    def logprob(self, index: int, token: int, top: int) -> SampledLogprob:
        return sampled_logprob(self.context, index, token, top)

    def release(self, sequence: Sequence) -> None:
        sampler = self._samplers.pop(sequence.id, None)
        if sampler is not None:
            sampler.close()

    # --- KV ----------------------------------------------------------------------------------------------

    def prepare(self, plan: StepPlan) -> tuple[dict[int, int], list[Sequence]]:
        """Everything before the decode: free dropped host entries, save slots to host RAM, then copy, restore
        and trim KV for the slots set up in this step. Returns the saved entries' sizes and the sequences whose
        restore llama.cpp refused (their slot is empty now)."""
        for entry in plan.drops:
            self._host.pop(entry, None)
            self._disk.pop(entry, None)
        saved: dict[int, int] = {}
        for save in plan.saves:
            started = time.perf_counter()
            data = self.context.save_sequence(save.slot)
            self._host[save.entry] = data
            saved[save.entry] = len(data)
            self.costs.observe_copy(save.cells, time.perf_counter() - started)
        failed: list[Sequence] = []
        for setup in plan.setups:
            if setup.copy_from is not None:
                self.context.copy_sequence(setup.copy_from, setup.slot)
            elif setup.restore is not None:
                started = time.perf_counter()
                data = self._host.pop(setup.restore, None)
                from_ram = data is not None
                if data is None:
                    data = disk_entry_bytes(self.disk, self._disk.pop(setup.restore, None))
                if not data or not self.context.restore_sequence(setup.slot, data):
                    log.warning("could not restore KV into slot %d; prefilling %d tokens", setup.slot, setup.keep)
                    failed.append(setup.sequence)
                    continue
                if from_ram:  # a file read is not what a RAM copy costs
                    self.costs.observe_copy(setup.keep, time.perf_counter() - started)
            self.context.forget(setup.slot, setup.keep if setup.keep > 0 else -1)
        return saved, failed

    def forget(self, slot: int) -> None:
        self.context.forget(slot)

    def drop_host(self) -> None:
        self._host.clear()
        self._disk.clear()

    # --- the disk tier -------------------------------------------------------------------------------------

    def index_disk(self, entry_id: int, entry: DiskEntry) -> None:
        """A disk-tier file the scheduler knows as `entry_id`, read if it is restored."""
        self._disk[entry_id] = entry

    def spill(self, kept: list[tuple[str, int, list[int]]]) -> int:
        """Write to the disk tier what free slots ("slot", index, tokens) and host-RAM entries ("host", entry
        id, tokens) hold, in the order given (most valuable first). Returns how many entries were written."""
        if self.disk is None or not self.disk.enabled:
            return 0

        def items() -> Iterator[tuple[list[int], bytes | bytearray]]:
            for kind, index, tokens in kept:
                data = self.context.save_sequence(index) if kind == "slot" else self._host.get(index)
                if data:
                    yield tokens, data

        return self.disk.write_all(items())

    # --- the decode ----------------------------------------------------------------------------------------

    def decode(self, plan: StepPlan) -> dict[Sequence, int]:
        """Decode the plan's rows in one llama_batch; returns each sampled sequence's row index.

        Raises EngineError when llama.cpp fails the decode."""
        batch = self.batch
        batch.clear()
        indexes: dict[Sequence, int] = {}
        for rows in plan.rows:
            slot = rows.sequence.slot
            last = len(rows.tokens) - 1
            for offset, token in enumerate(rows.tokens):
                index = batch.add(token, rows.start + offset, slot, rows.sample and offset == last)
            if rows.sample:
                indexes[rows.sequence] = index
        decode_rows, prefill_tokens = plan.decode_rows, plan.prefill_tokens
        started = time.perf_counter()
        self.context.decode(batch)
        if not any(setup.copy_from is not None for setup in plan.setups):  # a stream copy ran inside this decode
            self.costs.observe_step(decode_rows, prefill_tokens, time.perf_counter() - started)
        return indexes

    def close(self) -> None:
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()
        self._host.clear()
        self.batch.close()
        self.context.close()


def disk_entry_bytes(disk: DiskCache | None, entry: DiskEntry | None) -> bytearray:
    """The bytes of a disk-tier entry (empty when there is none or it does not read back)."""
    if disk is None or entry is None:
        return bytearray()
    return disk.read(entry)
