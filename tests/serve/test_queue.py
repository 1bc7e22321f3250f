"""RequestQueue: slot accounting, priority with aging, refusal, timeout, cancellation and its races.

pytest-asyncio is not a dependency, so each test is a plain function that runs a coroutine with asyncio.run.
Time-dependent ordering uses a fake clock; only the timeout test waits in real time (a few milliseconds).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import EmberError, InvalidRequestError, RequestTimeoutError, ServerBusyError
from ember.serve.queue import RequestQueue, Ticket
from ember.types import Priority, parse_priority

H, N, L = Priority.HIGH, Priority.NORMAL, Priority.LOW


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def acquire_now(queue: RequestQueue, priority: Priority = N) -> Ticket:
    """Acquire and prove it never suspended: the coroutine must finish on its first step."""
    coro = queue.acquire(priority)
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    return stop.value.value


async def enqueue(queue: RequestQueue, priority: Priority = N, **kwargs: Any) -> asyncio.Task[Ticket]:
    """Start an acquire and let it reach the queue, so arrival order is the call order."""
    task = asyncio.create_task(queue.acquire(priority, **kwargs))
    await asyncio.sleep(0)
    return task


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def drain_order(queue: RequestQueue, holder: Ticket, tasks: dict[str, asyncio.Task[Ticket]]) -> list[str]:
    """With one slot: release the holder, then each granted ticket in turn; return the names in grant order."""
    order: list[str] = []
    queue.release(holder)
    while len(order) < len(tasks):
        await settle()
        done = [name for name, task in tasks.items() if task.done() and name not in order]
        assert len(done) == 1, done
        order.append(done[0])
        queue.release(tasks[done[0]].result())
    return order


def test_immediate_grant_and_counters() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=2, max_queued=4)
        first, second = acquire_now(queue), acquire_now(queue, H)
        assert (queue.slots, queue.in_use, queue.queued) == (2, 2, 0)
        async with first:
            pass
        assert first.released and queue.in_use == 1
        second.release()
        assert queue.in_use == 0

    run(main())


def test_priority_order_then_fifo_within_a_class() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=10, clock=FakeClock())
        holder = acquire_now(queue)
        tasks = {name: await enqueue(queue, prio) for name, prio in [("l1", L), ("n1", N), ("h1", H), ("n2", N)]}
        tasks["h2"] = await enqueue(queue, H)
        assert [p for p, _ in queue.snapshot()] == [H, H, N, N, L]
        assert await drain_order(queue, holder, tasks) == ["h1", "h2", "n1", "n2", "l1"]

    run(main())


def test_aging_lets_an_old_low_request_beat_a_new_high_one() -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=1, max_queued=10, aging_seconds=10.0, clock=clock)
        holder = acquire_now(queue)
        tasks = {"old_low": await enqueue(queue, L)}
        clock.now += 20.0  # two aging periods: LOW now competes as HIGH, and arrived first
        tasks["new_high"] = await enqueue(queue, H)
        assert queue.snapshot() == [(L, 20.0), (H, 0.0)]
        assert await drain_order(queue, holder, tasks) == ["old_low", "new_high"]

    run(main())


def test_aging_is_not_enough_before_a_full_period() -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=1, max_queued=10, aging_seconds=10.0, clock=clock)
        holder = acquire_now(queue)
        tasks = {"low": await enqueue(queue, L)}
        clock.now += 19.9  # one period only: effective NORMAL, still behind HIGH
        tasks["high"] = await enqueue(queue, H)
        assert await drain_order(queue, holder, tasks) == ["high", "low"]

    run(main())


def test_full_queue_refuses_with_503_and_keeps_the_queued() -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=1, max_queued=2, clock=clock)
        warm = acquire_now(queue)
        clock.now += 30.0  # one 30 s hold in the history feeds the estimate
        queue.release(warm)
        holder = acquire_now(queue)
        waiting = [await enqueue(queue), await enqueue(queue, H)]
        with pytest.raises(ServerBusyError) as refused:
            await queue.acquire(H)
        err = refused.value
        assert err.http_status == 503 and err.retry_after >= 1
        assert err.retry_after == 90  # 30 s × (2 waiting + 1) / 1 slot
        assert "maximum pending requests exceeded" in str(err) and "2" in str(err)
        assert queue.queued == 2 and not any(t.done() for t in waiting)
        queue.release(holder)
        await settle()
        assert waiting[1].done() and queue.queued == 1

    run(main())


def test_retry_after_is_at_least_one_second_without_history() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=0)
        acquire_now(queue)
        with pytest.raises(ServerBusyError) as refused:
            await queue.acquire()
        assert refused.value.retry_after == 1

    run(main())


def test_timeout_while_queued_raises_504_and_leaves_the_queue() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        other = await enqueue(queue)
        with pytest.raises(RequestTimeoutError) as timed_out:
            await queue.acquire(H, timeout=0.01)
        assert timed_out.value.http_status == 504 and "0.01 s" in str(timed_out.value)
        assert "timeout" in str(timed_out.value)
        assert queue.queued == 1
        queue.release(holder)
        await settle()
        assert other.done() and queue.in_use == 1

    run(main())


def test_cancel_while_queued_removes_it_and_the_slot_goes_to_the_next() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        gone, nxt = await enqueue(queue, H), await enqueue(queue, L)
        gone.cancel()
        await settle()
        assert gone.cancelled() and queue.queued == 1
        queue.release(holder)
        await settle()
        assert nxt.done() and queue.in_use == 1 and queue.queued == 0

    run(main())


@pytest.mark.parametrize("with_next_waiter", [True, False])
def test_cancel_racing_a_grant_loses_no_slot(with_next_waiter: bool) -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        racer = await enqueue(queue, H)
        nxt = await enqueue(queue, L) if with_next_waiter else None
        queue.release(holder)  # grants racer's future synchronously ...
        assert queue.in_use == 1 and queue.queued == (1 if nxt else 0)
        racer.cancel()  # ... and the caller goes away before racer's task resumes
        await settle()
        assert racer.cancelled()
        if nxt is not None:
            assert nxt.done() and queue.in_use == 1
            nxt.result().release()
        assert queue.in_use == 0 and queue.queued == 0
        acquire_now(queue).release()

    run(main())


def test_timeout_racing_a_grant_loses_no_slot() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        racer = await enqueue(queue, timeout=0.05)
        nxt = await enqueue(queue, L)
        # The release timer is due before racer's timeout timer; block the loop until both are due, so one loop
        # pass runs the release (granting racer) and then the timeout, before racer's task can resume.
        asyncio.get_running_loop().call_later(0.001, queue.release, holder)
        time.sleep(0.1)
        await settle()
        assert isinstance(racer.exception(), RequestTimeoutError)
        assert nxt.done() and queue.in_use == 1 and queue.queued == 0
        nxt.result().release()
        assert queue.in_use == 0

    run(main())


def test_release_is_idempotent_and_checks_the_queue() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=2, max_queued=4)
        ticket, other = acquire_now(queue), acquire_now(queue)
        queue.release(ticket)
        queue.release(ticket)
        ticket.release()
        assert queue.in_use == 1
        with pytest.raises(ValueError):
            RequestQueue(slots=1, max_queued=1).release(other)

    run(main())


def test_set_slots_growing_grants_at_once_and_shrinking_drains() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        waiters = [await enqueue(queue) for _ in range(3)]
        queue.set_slots(3)
        assert queue.in_use == 3 and queue.queued == 1
        await settle()
        assert [t.done() for t in waiters] == [True, True, False]
        queue.set_slots(1)
        holder.release()
        waiters[0].result().release()
        assert queue.in_use == 1 and queue.queued == 1  # still above the new count: no grant
        waiters[1].result().release()
        await settle()
        assert waiters[2].done() and queue.in_use == 1
        with pytest.raises(ValueError):
            queue.set_slots(0)

    run(main())


def test_fail_all_raises_the_error_in_every_waiter() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=1, max_queued=4)
        holder = acquire_now(queue)
        waiters = [await enqueue(queue, p, timeout=5) for p in (H, N, L)]
        queue.fail_all(EmberError("the model was unloaded"))
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, EmberError) and "unloaded" in str(r) for r in results)
        assert queue.queued == 0 and queue.in_use == 1
        holder.release()
        acquire_now(queue).release()

    run(main())


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, N), ("high", H), ("NORMAL", N), ("Low", L), (" low ", L), (0, H), (1, N), (2, L), (Priority.LOW, L)],
)
def test_parse_priority_accepts(value: str | int | None, expected: Priority) -> None:
    assert parse_priority(value) is expected


@pytest.mark.parametrize("value", ["urgent", "", "1", 3, -1, True, 1.0])
def test_parse_priority_refuses(value: Any) -> None:
    with pytest.raises(InvalidRequestError, match="'high', 'normal' or 'low'"):
        parse_priority(value)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(list(Priority))),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0, 30)),
        st.tuples(st.just("yield"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(slots=st.integers(1, 3), ops=OPS)
def test_random_operations_never_overbook_or_lose_slots(slots: int, ops: list[tuple[str, Any]]) -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=slots, max_queued=8, aging_seconds=10.0, clock=clock)
        tasks: list[asyncio.Task[Ticket]] = []
        for op, arg in ops:
            if op == "acquire":
                tasks.append(asyncio.create_task(queue.acquire(arg)))
            elif op == "tick":
                clock.now += arg
            elif op == "yield":
                await asyncio.sleep(0)
            else:
                pick = random.Random(arg)
                if op == "release":
                    held = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
                    if held:
                        pick.choice(held).result().release()  # may repeat a release: must be harmless
                else:
                    pending = [t for t in tasks if not t.done()]
                    if pending:
                        pick.choice(pending).cancel()  # without yielding first, so grant/cancel races occur
            assert 0 <= queue.in_use <= queue.slots
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Ticket):
                result.release()
            else:
                assert isinstance(result, asyncio.CancelledError | ServerBusyError), result
        assert queue.in_use == 0 and queue.queued == 0
        acquire_now(queue).release()

    run(main())


# --- batch tickets: a class with a cap (EMBER_BATCH_SLOTS) -------------------------------------------------


def test_batch_cap_defaults_to_all_slots_but_one() -> None:
    assert RequestQueue(slots=4, max_queued=1).batch_slots == 3
    assert RequestQueue(slots=1, max_queued=1).batch_slots == 1  # one slot: batches may still run
    assert RequestQueue(slots=4, max_queued=1, batch_slots=2).batch_slots == 2
    assert RequestQueue(slots=2, max_queued=1, batch_slots=8).batch_slots == 2
    with pytest.raises(ValueError):
        RequestQueue(slots=2, max_queued=1, batch_slots=0)


def test_batch_lines_never_hold_more_than_the_cap_and_interactive_gets_the_free_slot() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=3, max_queued=10, clock=FakeClock())
        lines = [await enqueue(queue, L, batch=True) for _ in range(4)]
        await settle()
        assert [t.done() for t in lines] == [True, True, False, False]
        assert (queue.in_use, queue.batch_in_use, queue.queued) == (2, 2, 2)
        interactive = acquire_now(queue, N)  # the slot kept free is granted at once, ahead of the waiting lines
        assert queue.in_use == 3
        lines[0].result().release()  # a batch slot frees: the next line takes it
        await settle()
        assert lines[2].done() and not lines[3].done() and queue.batch_in_use == 2
        interactive.release()  # the interactive slot frees: a line may not take it (cap reached)
        await settle()
        assert not lines[3].done() and queue.in_use == 2
        for task in lines[1:3]:
            task.result().release()
        await settle()
        assert lines[3].done() and queue.batch_in_use == 1

    run(main())


def test_a_capped_batch_waiter_does_not_block_an_interactive_waiter_behind_it() -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=2, max_queued=10, clock=clock)
        line = acquire_now(queue)  # not batch: fills a slot
        first_line = await enqueue(queue, L, batch=True)
        await settle()
        assert first_line.done()  # cap 1 of 2, one slot was free
        second_line = await enqueue(queue, H, batch=True)  # best rank, but over the cap
        interactive = await enqueue(queue, L)
        clock.now += 100.0
        line.release()
        await settle()
        assert interactive.done() and not second_line.done()
        first_line.result().release()
        await settle()
        assert second_line.done()

    run(main())


def test_set_slots_moves_the_default_batch_cap() -> None:
    async def main() -> None:
        queue = RequestQueue(slots=2, max_queued=10)
        lines = [await enqueue(queue, L, batch=True) for _ in range(3)]
        await settle()
        assert sum(t.done() for t in lines) == 1
        queue.set_slots(4)  # cap becomes 3
        await settle()
        assert all(t.done() for t in lines) and queue.batch_in_use == 3

    run(main())


BATCH_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.tuples(st.sampled_from(list(Priority)), st.booleans())),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0, 30)),
        st.tuples(st.just("yield"), st.just(0)),
        st.tuples(st.just("resize"), st.integers(1, 4)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(slots=st.integers(1, 4), cap=st.one_of(st.none(), st.integers(1, 4)), ops=BATCH_OPS)
def test_random_batch_operations_keep_the_cap_and_leave_no_slot_idle(
    slots: int, cap: int | None, ops: list[tuple[str, Any]]
) -> None:
    """Never more batch tickets than the cap, never a waiter left beside a slot it may take, nothing lost."""

    async def main() -> None:
        clock = FakeClock()
        queue = RequestQueue(slots=slots, max_queued=8, aging_seconds=10.0, clock=clock, batch_slots=cap)
        tasks: list[tuple[asyncio.Task[Ticket], bool]] = []
        granted: set[int] = set()
        for op, arg in ops:
            if op == "acquire":
                priority, batch = arg
                tasks.append((asyncio.create_task(queue.acquire(priority, batch=batch)), batch))
            elif op == "tick":
                clock.now += arg
            elif op == "yield":
                await asyncio.sleep(0)
            elif op == "resize":
                queue.set_slots(arg)
            else:
                pick = random.Random(arg)
                if op == "release":
                    held = [t for t, _ in tasks if t.done() and not t.cancelled() and t.exception() is None]
                    if held:
                        pick.choice(held).result().release()
                else:
                    pending = [t for t, _ in tasks if not t.done()]
                    if pending:
                        pick.choice(pending).cancel()
            await settle()
            held = [(t.result(), b) for t, b in tasks if t.done() and not t.cancelled() and t.exception() is None]
            live = [(ticket, b) for ticket, b in held if not ticket.released]
            assert queue.in_use == len(live)
            assert queue.batch_in_use == sum(b for _, b in live)
            assert all(ticket.batch == b for ticket, b in live)
            new_batch_grants = [id(ticket) for ticket, b in held if b and id(ticket) not in granted]
            granted.update(id(ticket) for ticket, _ in held)
            if new_batch_grants:  # (after a shrink the count may stay above the cap a while, but never grows there)
                assert queue.batch_in_use <= queue.batch_slots
            waiting = [b for t, b in tasks if not t.done()]
            if waiting and queue.in_use < queue.slots:  # a free slot: only batch lines over the cap may wait beside it
                assert all(waiting) and queue.batch_in_use >= queue.batch_slots, (waiting, queue.batch_in_use)
        for task, _ in tasks:
            task.cancel()
        results = await asyncio.gather(*(t for t, _ in tasks), return_exceptions=True)
        for result in results:
            if isinstance(result, Ticket):
                result.release()
            else:
                assert isinstance(result, asyncio.CancelledError | ServerBusyError), result
        assert queue.in_use == 0 and queue.batch_in_use == 0 and queue.queued == 0

    run(main())
