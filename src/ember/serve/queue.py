"""The per-model request queue: N slots, waiters served by priority with aging.

Ollama serves a model's requests first come, first served. ember lets a caller mark a request HIGH, NORMAL or
LOW; to keep LOW requests from starving under a steady stream of HIGH ones, a waiter's priority improves by
one class per `aging_seconds` it has waited. Ties go to the earlier arrival.

Batch tickets (lines of a batch job) are a class of their own with a cap, `batch_slots` (default: all slots but
one): however long batch lines wait or however many there are, they never hold more than the cap at once, so an
interactive request finds a free slot and keeps its latency while a batch runs. A batch waiter past the cap is
skipped, not blocking the others: the next free slot goes to the best waiter that may take it.

Threading: a `RequestQueue` belongs to one asyncio event loop and is not thread-safe. Every method must be
called from that loop's thread; code running elsewhere (an engine thread finishing a sequence) releases
with `loop.call_soon_threadsafe(queue.release, ticket)`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from ember.errors import RequestTimeoutError, ServerBusyError
from ember.types import Priority


class Ticket:
    """Proof of one held slot. Give it back with `release()` or by leaving `async with ticket:`.

    Releasing twice is harmless, so a `finally` block may release a ticket that a cleanup path already did.
    """

    __slots__ = ("_queue", "batch", "granted_at", "priority", "released")

    def __init__(self, queue: RequestQueue, priority: Priority, granted_at: float, batch: bool = False) -> None:
        self._queue = queue
        self.priority = priority
        self.granted_at = granted_at
        self.batch = batch  # counts against the queue's batch_slots
        self.released = False

    def release(self) -> None:
        """Free the slot; the same as `queue.release(ticket)`."""
        self._queue.release(self)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    arrived: float
    seq: int
    future: asyncio.Future[Ticket] = field(repr=False)
    batch: bool = False


class RequestQueue:
    """Hands out a model's `slots` to requests, queueing at most `max_queued` of them.

    Waiters are kept in a plain list and the next one is chosen by a scan at grant time: effective priority
    depends on the current time, so a heap ordered at arrival would go stale, and queues are short (bounded
    by `max_queued`, typically tens to hundreds).
    """

    #: How many recent slot hold times feed the retry_after estimate.
    HOLD_SAMPLES = 32

    def __init__(
        self,
        *,
        slots: int,
        max_queued: int,
        aging_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        batch_slots: int | None = None,
    ) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be 0 or more, not {max_queued}")
        if not aging_seconds > 0:
            raise ValueError(f"aging_seconds must be positive, not {aging_seconds}")
        self._slots = self._check_slots(slots)
        if batch_slots is not None and batch_slots < 1:
            raise ValueError(f"batch_slots must be 1 or more (or None: all slots but one), not {batch_slots}")
        self._batch_cap = batch_slots
        self._batch_in_use = 0
        self._max_queued = max_queued
        self._aging = aging_seconds
        self._clock = clock
        self._in_use = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._holds: deque[float] = deque(maxlen=self.HOLD_SAMPLES)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def in_use(self) -> int:
        """Slots held by granted, unreleased tickets (may exceed `slots` for a while after `set_slots` shrinks)."""
        return self._in_use

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def batch_slots(self) -> int:
        """The most slots batch tickets may hold at once: the cap given (at most `slots`), else all but one."""
        if self._batch_cap is None:
            return max(1, self._slots - 1)
        return min(self._batch_cap, self._slots)

    @property
    def batch_in_use(self) -> int:
        return self._batch_in_use

    async def acquire(
        self, priority: Priority = Priority.NORMAL, *, timeout: float | None = None, batch: bool = False
    ) -> Ticket:
        """Wait for a slot and return its ticket; the caller must release it. `batch` marks a batch line's ticket.

        Raises ServerBusyError at once when `max_queued` requests already wait, RequestTimeoutError when
        `timeout` seconds (event-loop time) pass first, and whatever `fail_all` was given. If the waiting task
        is cancelled, or times out, just as a slot was granted to it, the slot goes on to the next waiter.
        """
        # Between calls no waiter could take a free slot (_dispatch grants every one that can), so a request
        # that may take one now jumps nobody: only capped batch waiters can be waiting beside a free slot.
        if self._may_take_slot(batch):
            return self._grant(priority, batch)  # no await on this path: the grant is immediate
        if len(self._waiters) >= self._max_queued:
            raise ServerBusyError(self._max_queued, self.retry_after())
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(priority, self._clock(), next(self._seq), future, batch)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            if self._failed(future):
                raise  # fail_all's own error, which happened to be a TimeoutError
            self._abandon(waiter)
            raise RequestTimeoutError(timeout or 0.0) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's slot and grant it to the next waiter; does nothing if it is already released."""
        if ticket._queue is not self:
            raise ValueError("this ticket belongs to another queue")
        if ticket.released:
            return
        ticket.released = True
        self._in_use -= 1
        if ticket.batch:
            self._batch_in_use -= 1
        self._holds.append(max(0.0, self._clock() - ticket.granted_at))
        self._dispatch()

    def set_slots(self, slots: int) -> None:
        """Change the slot count (the model reloaded with another num_parallel); the batch cap follows it.

        Growing grants waiters at once. Shrinking revokes nothing: held tickets run to completion, and no new
        grant happens until `in_use` falls below the new count.
        """
        self._slots = self._check_slots(slots)
        self._dispatch()

    def snapshot(self) -> list[tuple[Priority, float]]:
        """Each waiter's priority and seconds waited, in the order they would be served now (for monitoring)."""
        now = self._clock()
        order = sorted(self._waiters, key=lambda w: self._rank(w, now))
        return [(w.priority, now - w.arrived) for w in order]

    def fail_all(self, error: Exception) -> None:
        """Make every waiter raise `error` (the model was unloaded, or its runner died, before they started).

        Held tickets are untouched and the queue stays usable: a reloaded model can keep serving through it.
        Every waiter raises the same exception object.
        """
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: mean recent hold time × (waiters + 1) / slots, at least 1.

        A rough guess at when the queue will have drained enough to take one more request. With no hold
        history yet it is 1.
        """
        if not self._holds:
            return 1
        mean_hold = sum(self._holds) / len(self._holds)
        return max(1, math.ceil(mean_hold * (len(self._waiters) + 1) / self._slots))

    # -- internals ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_slots(slots: int) -> int:
        if slots < 1:
            raise ValueError(f"slots must be 1 or more, not {slots}")
        return slots

    def _rank(self, waiter: _Waiter, now: float) -> tuple[int, int]:
        """Effective priority (class minus one per aging period waited), then arrival order."""
        aged = math.floor(max(0.0, now - waiter.arrived) / self._aging)
        return (int(waiter.priority) - aged, waiter.seq)

    def _may_take_slot(self, batch: bool) -> bool:
        return self._in_use < self._slots and (not batch or self._batch_in_use < self.batch_slots)

    def _grant(self, priority: Priority, batch: bool = False) -> Ticket:
        self._in_use += 1
        if batch:
            self._batch_in_use += 1
        return Ticket(self, priority, self._clock(), batch)

    def _dispatch(self) -> None:
        """Grant free slots to the best waiters that may take one. Synchronous, so the counts are always exact."""
        while self._in_use < self._slots:
            eligible = [w for w in self._waiters if self._may_take_slot(w.batch)]
            if not eligible:
                return
            now = self._clock()
            waiter = min(eligible, key=lambda w: self._rank(w, now))
            self._waiters.remove(waiter)
            if not waiter.future.done():  # a cancelled waiter whose task has not run its cleanup yet
                waiter.future.set_result(self._grant(waiter.priority, waiter.batch))

    @staticmethod
    def _failed(future: asyncio.Future[Ticket]) -> bool:
        return future.done() and not future.cancelled() and future.exception() is not None

    def _abandon(self, waiter: _Waiter) -> None:
        """Take a timed-out or cancelled waiter out; if a slot was granted to it meanwhile, pass the slot on."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self.release(waiter.future.result())
