"""The scheduler: what the next engine step does. Plain data in, a `StepPlan` out; no llama.cpp here.

`schedule()` decides which sequences get which tokens in the next llama_batch, which slot (KV stream) a new
sequence takes, and which KV is first saved to host RAM, restored from it, copied between slots or trimmed.
The executor (`executor.py`) carries the plan out on llama.cpp; `update()` takes what the step sampled and
which sequences finished. Its tests build sequences by hand and never load a model.

Slot choice is by value: a new prompt can start from the KV a free slot already holds (the next turn of a
chat), from a copy of another slot's KV (one system prompt shared by many users), or from KV kept in host RAM
(a conversation whose slot was given to others), or from the disk tier (what a model kept on disk when it last
closed: `kv_disk.py`; indexed here like host entries, using no RAM). Each free slot is scored by the prompt
tokens it lets the sequence skip, minus the cached tokens that taking it would destroy; tokens saved to host
RAM first are not destroyed, but moving them costs two copies. A slot holding another conversation is taken
only to continue it (keeping at least half of what it holds) or when no free slot is empty; so an empty or
least valuable slot is taken before a slot whose cache would be lost for a tiny gain. (llama-server takes any
free slot sharing more than 10% of the prompt, even when that destroys most of its cache, and otherwise the
least recently used.)

Prefill: on the CPU, llama.cpp computes a sequence's rows in one ubatch bit for bit like one row at a time
while they are fewer than 64 (measured with SmolLM2 Q4_1; larger ubatches use another kernel with other
rounding). By default a prompt is prefilled in whole num_batch chunks, the fastest way; `deterministic` keeps
each sequence's chunk at EXACT_CHUNK tokens, so a reused or restored prefix gives exactly the text a fresh run
gives. Either way, while streams that someone watches are generating (any but batch lines), a step prefills
at most as many tokens as fit in one more decode step's time (`step_costs.StepCosts.prefill_budget`), so their
inter-token latency stays within ITL_FACTOR times that of a decode-only step; what earlier steps left unspent
(up to ITL_BURST_STEPS budgets) lets a short prompt in at once. Prompts take the budget in priority order.
An interactive prompt that goes in whole is prefilled in a step without the streams' rows: its first token
then waits for a small step instead of a full one (~25 ms sooner with 7 streams on 2 cores), and the streams'
next token for one more small step's fixed cost (~5 ms).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from ember.engine.sequence import CacheSource, DoneReason, Phase, Sequence
from ember.engine.step_costs import StepCosts
from ember.types import Priority

EXACT_CHUNK = 48  # prompt tokens per sequence per step in deterministic mode: below llama.cpp's 64-row switch
# A short prompt may be taken whole in one step, up to the budget of this many steps, when the steps before
# spent less than theirs: so a short request arriving while streams decode waits one step, not several,
# while a long prompt still runs at the steady budget (the streams' steps stay within ITL_FACTOR).
ITL_BURST_STEPS = 4


@dataclass(frozen=True, slots=True)
class SaveToHost:
    """Copy a slot's KV (`cells` tokens) into host RAM as `entry` before the slot is reused."""

    slot: int
    entry: int
    cells: int


@dataclass(frozen=True, slots=True)
class SlotSetup:
    """Prepare `slot` for `sequence`: first copy another slot's KV in or restore a host entry (or neither),
    then keep the first `keep` positions and forget the rest."""

    sequence: Sequence
    slot: int
    keep: int
    copy_from: int | None = None
    restore: int | None = None


@dataclass(frozen=True, slots=True)
class BatchRows:
    """One sequence's tokens in the batch, from position `start`; `sample`: its last row's logits are used;
    `prefill`: prompt tokens (else the one token a generating sequence sampled last)."""

    sequence: Sequence
    tokens: list[int]
    start: int
    sample: bool
    prefill: bool


@dataclass
class StepPlan:
    """What one step does, in this order: drop host entries, save slots to host, set slots up, decode rows."""

    drops: list[int] = field(default_factory=list)
    saves: list[SaveToHost] = field(default_factory=list)
    setups: list[SlotSetup] = field(default_factory=list)
    rows: list[BatchRows] = field(default_factory=list)  # in slot order (llama.cpp decodes consecutive ids together)
    started: list[Sequence] = field(default_factory=list)  # given a slot in this step
    cancelled: list[Sequence] = field(default_factory=list)  # finished by this step without decoding

    @property
    def decode_rows(self) -> int:
        return sum(1 for rows in self.rows if not rows.prefill)

    @property
    def prefill_tokens(self) -> int:
        return sum(len(rows.tokens) for rows in self.rows if rows.prefill)


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV holds while free
    owner: Sequence | None = None
    last_used: int = 0

    def content(self) -> list[int]:
        """The tokens whose KV the slot holds now (a running sequence's as of the last update)."""
        return self.owner.kv_tokens() if self.owner is not None else self.tokens


@dataclass
class HostEntry:
    id: int
    tokens: list[int]
    size: int  # bytes, as the executor saved them (estimated until then)
    last_used: int
    on_disk: bool = False  # a file of the disk tier (kv_disk.py), read when restored; it uses no RAM


class HostCache:
    """The index of the KV kept in host RAM (the bytes live in the executor): LRU under a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        self.entries: dict[int, HostEntry] = {}
        self._next_id = 1
        self._bytes_per_token: float = 0.0  # learned from saved entries, to estimate new ones
        self._drops: list[int] = []  # evicted, not yet freed by the executor

    @property
    def used(self) -> int:
        """Bytes of host RAM the entries hold (entries on disk hold none)."""
        return sum(entry.size for entry in self.entries.values() if not entry.on_disk)

    def estimate(self, tokens: int) -> int:
        return math.ceil(self._bytes_per_token * tokens)

    def best(self, prompt: list[int]) -> tuple[HostEntry | None, int]:
        best, best_common = None, 0
        for entry in self.entries.values():
            common = common_prefix(entry.tokens, prompt)
            if common > best_common:
                best, best_common = entry, common
        return best, best_common

    def holds(self, tokens: list[int]) -> bool:
        """Whether some entry already holds these tokens (or more after them)."""
        return any(common_prefix(entry.tokens, tokens) == len(tokens) for entry in self.entries.values())

    def add(self, tokens: list[int], now: int) -> int | None:
        """A new entry for `tokens`, making room by evicting the least recently used; None if it cannot fit."""
        estimated = self.estimate(len(tokens))
        if self.budget == 0 or estimated > self.budget:
            return None
        for entry in list(self.entries.values()):  # entries this one extends are no longer needed
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):
                self._drop(entry.id)
        self._evict(self.budget - estimated)
        entry = HostEntry(self._next_id, list(tokens), estimated, now)
        self._next_id += 1
        self.entries[entry.id] = entry
        return entry.id

    def add_disk(self, tokens: list[int], size: int) -> int:
        """An entry of the disk tier, found when the model loaded: older than any entry made since."""
        entry = HostEntry(self._next_id, list(tokens), size, last_used=0, on_disk=True)
        self._next_id += 1
        self.entries[entry.id] = entry
        if not self._bytes_per_token and tokens:
            self._bytes_per_token = size / len(tokens)
        return entry.id

    def saved(self, entry_id: int, size: int) -> None:
        """The executor saved the entry: its real size (evicting others if the estimate was low)."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return
        entry.size = size
        if entry.tokens:
            self._bytes_per_token = size / len(entry.tokens)
        if entry.size > self.budget:
            self._drop(entry_id)
        else:
            self._evict(self.budget, keep=entry_id)

    def take(self, entry_id: int) -> HostEntry:
        """Remove an entry to restore it into a slot (the slot owns that KV now)."""
        return self.entries.pop(entry_id)

    def take_drops(self) -> list[int]:
        drops, self._drops = self._drops, []
        return drops

    def clear(self) -> None:
        for entry_id in list(self.entries):
            self._drop(entry_id)

    def _evict(self, room: int, keep: int | None = None) -> None:
        while self.used > room:
            victims = [entry for entry in self.entries.values() if entry.id != keep and not entry.on_disk]
            if not victims:
                return
            self._drop(min(victims, key=lambda entry: entry.last_used).id)

    def _drop(self, entry_id: int) -> None:
        if self.entries.pop(entry_id, None) is not None:
            self._drops.append(entry_id)


@dataclass(frozen=True)
class _Choice:
    slot: Slot
    keep: int  # prompt tokens whose KV the sequence starts with
    source: CacheSource | None
    copy_from: int | None = None
    restore: int | None = None


class Scheduler:
    """Plans the steps of one engine: admission, slot choice, the prefix cache tiers, batch budgets."""

    def __init__(
        self,
        *,
        slots: int,
        batch_capacity: int,
        num_ctx: int,
        deterministic: bool = False,
        host_budget: int = 0,
        costs: StepCosts | None = None,
    ) -> None:
        self.slots = [Slot(index) for index in range(slots)]
        self.batch_capacity = batch_capacity
        self.num_ctx = num_ctx
        self.deterministic = deterministic
        self.prefix_reuse = True
        self.host = HostCache(host_budget)
        self.costs = costs or StepCosts()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._clock = 0
        self._fork_copies: list[tuple[int, Sequence]] = []  # (parent slot, fork) to copy at the next step
        self._prefill_credit = 0  # prompt tokens unspent by recent steps next to generating streams
        self._streams_skipped = False  # the last step prefilled short prompts without the streams' rows

    # --- sequences in and out ---------------------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_slots(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.owner is None]

    def cancel(self, sequence: Sequence) -> bool:
        """Cancel a sequence. True if it is finished now (it was waiting); else it ends at the next schedule."""
        if sequence.done:
            return False
        if sequence.phase is not Phase.WAITING:
            sequence.cancel_requested = True
            return False
        if sequence.parent is not None:
            sequence.parent.forks.remove(sequence)
        else:
            self.waiting.remove(sequence)
            for fork in reversed(sequence.forks):  # the copies cannot start without the prompt: each runs alone
                fork.parent = None
                self.waiting.appendleft(fork)
            sequence.forks = []
        self.finish(sequence, DoneReason.CANCELLED)
        return True

    def finish(self, sequence: Sequence, reason: DoneReason) -> None:
        """End a sequence; its slot keeps its KV for later sequences (not after an error)."""
        # A fork whose KV copy is still pending holds nothing yet.
        forked_only = sequence.phase is Phase.FORKED or any(fork is sequence for _, fork in self._fork_copies)
        sequence.phase = Phase.DONE
        sequence.done_reason = reason
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence.slot >= 0:
            slot = self.slots[sequence.slot]
            slot.owner = None
            slot.tokens = [] if reason is DoneReason.ERROR or forked_only else sequence.kv_tokens()
            sequence.slot = -1
        self._fork_copies = [(source, fork) for source, fork in self._fork_copies if fork is not sequence]
        for fork in sequence.forks:  # it ended before its prompt was in: the copies prefill it themselves
            if fork.phase is Phase.FORKED:
                fork.parent = None
                fork.phase = Phase.PREFILL

    def forget_free_slots(self) -> list[int]:
        """Drop the cache of every free slot and of host RAM; returns the slots the executor must clear."""
        self.host.clear()
        free = self.free_slots()
        for index in free:
            self.slots[index].tokens = []
        return free

    # --- planning -------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for sequence in [s for s in self.running if s.cancel_requested]:
            self.finish(sequence, DoneReason.CANCELLED)
            plan.cancelled.append(sequence)
        busy: set[int] = set()  # slots copied from or into in this step: no other KV operation may touch them
        for source, fork in self._fork_copies:
            plan.setups.append(SlotSetup(fork, fork.slot, fork.n_past, copy_from=source))
            busy.update((source, fork.slot))
        self._fork_copies = []
        self._admit(plan, busy)
        plan.drops = self.host.take_drops()
        self._fill_batch(plan)
        return plan

    def _admit(self, plan: StepPlan, busy: set[int]) -> None:
        while self.waiting:
            sequence = self.waiting[0]
            free = [slot for slot in self.slots if slot.owner is None and slot.index not in busy]
            if len(free) < 1 + len(sequence.forks):
                return
            self.waiting.popleft()
            # Copying from a free slot makes it busy for this step: only when the forks still find enough others.
            choice = self._choose(sequence, free, busy, copy_free=len(free) > 1 + len(sequence.forks))
            self._take(plan, sequence, choice)
            busy.add(choice.slot.index)
            if choice.copy_from is not None:
                busy.add(choice.copy_from)
            for fork in sequence.forks:
                free = [slot for slot in self.slots if slot.owner is None and slot.index not in busy]
                fork_choice = _Choice(self._cheapest(free), 0, None)
                self._take(plan, fork, fork_choice)
                busy.add(fork_choice.slot.index)

    def _choose(self, sequence: Sequence, free: list[Slot], busy: set[int], *, copy_free: bool) -> _Choice:
        prompt = sequence.prompt_tokens
        usable = len(prompt) - 1  # the last prompt token is decoded again: its logits give the first new token
        if not self.prefix_reuse:
            return _Choice(self._cheapest(free), 0, None)
        # Where else the prefix is: other slots (copied whole, num_ctx cells) and host RAM (its own cells).
        sources: list[tuple[int, int | None, int | None]] = []  # (tokens saved, copy_from, restore)
        for slot in self.slots:
            if slot.index in busy or (slot.owner is None and not copy_free):
                continue
            common = min(common_prefix(slot.content(), prompt), usable)
            if common > self.costs.copy_worth(self.num_ctx):
                sources.append((common, slot.index, None))
        entry, common = self.host.best(prompt)
        if entry is not None and min(common, usable) > self.costs.copy_worth(len(entry.tokens)):
            sources.append((min(common, usable), None, entry.id))

        def score(choice: _Choice) -> tuple[bool, int, bool, bool, bool, int]:
            slot = choice.slot
            kept = choice.keep if choice.source is CacheSource.SLOT else 0
            displaced = len(slot.tokens) - kept
            if displaced == 0:
                loss = 0
            elif self._preserved(slot):  # saved to host RAM now, restored if it comes back: two copies
                loss = 2 * self.costs.copy_worth(len(slot.tokens))
            else:
                loss = displaced
            return (
                displaced == 0 or kept >= displaced,  # displace another's cache only to continue it, or when full
                choice.keep - loss,
                choice.copy_from is None and choice.restore is None,
                not slot.tokens,
                self._adjacent(slot.index),
                -slot.last_used,
            )

        choices: list[_Choice] = []
        for slot in free:
            own = min(common_prefix(slot.tokens, prompt), usable)
            choices.append(_Choice(slot, own, CacheSource.SLOT if own > 0 else None))
            for saved, copy_from, restore in sources:
                if copy_from == slot.index or saved <= own:
                    continue
                if copy_from is not None:
                    source = CacheSource.COPY
                else:
                    on_disk = restore is not None and self.host.entries[restore].on_disk
                    source = CacheSource.DISK if on_disk else CacheSource.HOST
                choices.append(_Choice(slot, saved, source, copy_from, restore))
        return max(choices, key=score)

    def _preserved(self, slot: Slot) -> bool:
        """Whether a slot's cache survives being reused: already in host RAM, or it will be saved there."""
        if not slot.tokens or self.host.holds(slot.tokens):
            return True
        return self.host.budget > 0 and self.host.estimate(len(slot.tokens)) <= self.host.budget

    def _cheapest(self, free: list[Slot]) -> Slot:
        """The free slot whose loss matters least: empty first, then next to the running ones, then the LRU."""
        return min(free, key=lambda slot: (len(slot.tokens) > 0, not self._adjacent(slot.index), slot.last_used))

    def _adjacent(self, index: int) -> bool:
        in_use = {slot.index for slot in self.slots if slot.owner is not None}
        return not in_use or index - 1 in in_use or index + 1 in in_use

    def _take(self, plan: StepPlan, sequence: Sequence, choice: _Choice) -> None:
        slot = choice.slot
        if choice.restore is not None:
            self.host.take(choice.restore)
        kept_own = choice.keep if choice.source is CacheSource.SLOT else 0
        if len(slot.tokens) > max(kept_own, 1) and not self.host.holds(slot.tokens):
            entry = self.host.add(slot.tokens, self._tick())
            if entry is not None:
                plan.saves.append(SaveToHost(slot.index, entry, len(slot.tokens)))
        plan.setups.append(SlotSetup(sequence, slot.index, choice.keep, choice.copy_from, choice.restore))
        slot.owner = sequence
        slot.tokens = sequence.prompt_tokens[: choice.keep]
        slot.last_used = self._tick()
        sequence.slot = slot.index
        sequence.n_past = sequence.cached_tokens = choice.keep
        sequence.cache_source = choice.source if choice.keep > 0 else None
        sequence.phase = Phase.FORKED if sequence.parent is not None else Phase.PREFILL
        self.running.append(sequence)
        plan.started.append(sequence)

    def setup_failed(self, plan: StepPlan, sequence: Sequence) -> None:
        """The executor could not restore or copy the planned KV: the sequence prefills from the start."""
        sequence.n_past = sequence.cached_tokens = 0
        sequence.cache_source = None
        self.slots[sequence.slot].tokens = []
        plan.rows = [rows for rows in plan.rows if rows.sequence is not sequence]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _fill_batch(self, plan: StepPlan) -> None:
        decoding = [s for s in self.running if s.phase is Phase.DECODE]
        budget = self.batch_capacity - len(decoding)
        # The inter-token latency is kept for streams someone watches: when every generating row is a batch
        # line (low priority), prompts go in whole batches, which is what a batch's throughput wants.
        watched = any(s.request.priority < Priority.LOW for s in decoding)
        bound = self.costs.prefill_budget(len(decoding)) if watched else None
        if bound is not None:
            budget = min(budget, bound + self._prefill_credit)
        chunk_limit = EXACT_CHUNK if self.deterministic else self.batch_capacity
        chunks: dict[int, int] = {}
        # The most urgent prompt gets the budget first (an interactive request before a batch line's), then the
        # earliest admitted.
        prefilling = sorted(
            (sequence for sequence in self.running if sequence.phase is Phase.PREFILL),
            key=lambda sequence: sequence.request.priority,
        )
        for sequence in prefilling:
            if budget > 0:
                take = min(len(sequence.prompt_tokens) - sequence.n_past, chunk_limit, budget)
                chunks[sequence.id] = take
                budget -= take
        if bound is None:  # nothing generating (or nothing measured yet): the next burst may be whole
            self._prefill_credit = (ITL_BURST_STEPS - 1) * (self.costs.prefill_budget(1) or 0)
        else:
            spent = sum(chunks.values())
            self._prefill_credit = max(0, min((ITL_BURST_STEPS - 1) * bound, self._prefill_credit + bound - spent))
        taking = [sequence for sequence in prefilling if sequence.id in chunks]
        # Prompts that go in whole beside watched streams (a short request) get the step to themselves: their
        # first token comes a decode step sooner, the streams' next one later by a small step's fixed cost. Never
        # two such steps in a row: short requests arriving every step must not starve the streams.
        alone = (
            watched
            and not self._streams_skipped
            and bool(taking)
            and all(s.n_past + chunks[s.id] == len(s.prompt_tokens) for s in taking)
            and any(s.request.priority < Priority.LOW for s in taking)
        )
        self._streams_skipped = alone
        for sequence in sorted(self.running, key=lambda s: s.slot):
            if sequence.phase is Phase.DECODE and not alone:
                plan.rows.append(BatchRows(sequence, [sequence.next_token], sequence.n_past, True, False))
            elif sequence.id in chunks:
                start, end = sequence.n_past, sequence.n_past + chunks[sequence.id]
                tokens = sequence.prompt_tokens[start:end]
                plan.rows.append(BatchRows(sequence, tokens, start, end == len(sequence.prompt_tokens), True))

    # --- after the step --------------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: Mapping[Sequence, int], finished: Mapping[Sequence, DoneReason]) -> None:
        """Take what the step produced: every row decoded, the tokens sampled, the sequences that ended."""
        for rows in plan.rows:
            rows.sequence.n_past = rows.start + len(rows.tokens)
        for sequence, token in sampled.items():
            sequence.output_tokens.append(token)
            sequence.next_token = token
            if sequence.phase is Phase.FORKED and sequence.parent is not None:
                # Sampled from the parent's last prompt logits; its KV is copied in before the next decode.
                sequence.n_past = sequence.cached_tokens = len(sequence.prompt_tokens)
                sequence.cache_source = CacheSource.PARENT
                self._fork_copies.append((sequence.parent.slot, sequence))
            sequence.phase = Phase.DECODE
        for sequence, reason in finished.items():
            self.finish(sequence, reason)


def common_prefix(first: list[int], second: list[int]) -> int:
    """Length of the longest common prefix: a binary search over slice comparisons, which run in C."""
    low, high = 0, min(len(first), len(second))
    if first[:high] == second[:high]:
        return high
    while low < high:  # first[:low] == second[:low] and first[:high] != second[:high]
        middle = (low + high + 1) // 2
        if first[low:middle] == second[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low
