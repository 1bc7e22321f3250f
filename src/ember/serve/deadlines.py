"""Time limits on answers: a first-token timeout, a total timeout, and the end of the shutdown grace period.

The clock starts once the request's model is loaded (loading has its own limit, EMBER_LOAD_TIMEOUT, and a load
is shared by every request waiting for it, so one impatient request must not cancel it). Expiry cancels the
wait for the next chunk: the cancellation runs the runner stream's cleanup, which tells the runner to drop
the sequence (its KV cells are freed at the next engine step), and the manager's own cleanup frees the slot.
The caller then gets a ResponseTimeoutError (504, or an error line once a stream has begun).

On SIGTERM the server stops taking requests and calls `shut_down(grace)`: every answer still running gets
that long to finish, then ends with a ServerShuttingDownError, so each client sees either its whole answer or
a clear error, never a connection cut in the middle of a line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from ember.errors import ResponseTimeoutError, ServerShuttingDownError
from ember.serve.tracking import current_request

T = TypeVar("T")


def _earliest(*moments: float | None) -> float | None:
    present = [moment for moment in moments if moment is not None]
    return min(present) if present else None


class Deadlines:
    """The server's default limits, and the timers of the answers running now (to shorten them on shutdown)."""

    def __init__(self, first_token: float | None = None, total: float | None = None) -> None:
        self.first_token = first_token
        self.total = total
        self.shutdown_at: float | None = None  # loop time when answers still running are cut
        self._grace = 0.0
        self._timers: set[asyncio.Timeout] = set()

    def total_for_request(self) -> float | None:
        record = current_request()
        if record is not None and record.total_timeout is not None:
            return record.total_timeout
        return self.total

    def shut_down(self, grace: float) -> None:
        """Let every answer run for at most `grace` more seconds (and new ones as long, while the server
        drains)."""
        loop = asyncio.get_running_loop()
        self._grace = grace
        self.shutdown_at = loop.time() + grace
        for timer in self._timers:
            when = timer.when()
            if when is None or when > self.shutdown_at:
                timer.reschedule(self.shutdown_at)

    def queue_limit(self, queue_timeout: float | None, started: float) -> float | None:
        """Seconds the request may wait for a slot: its queue timeout, within its first-token and total limits."""
        limits = [limit for limit in (queue_timeout, self.first_token, self.total_for_request()) if limit is not None]
        if not limits:
            return None
        return max(0.001, min(limits) - (asyncio.get_running_loop().time() - started))

    async def timed(self, chunks: AsyncIterator[T], started: float) -> AsyncIterator[T]:
        """`chunks`, each awaited under the request's limits, counted from `started` (loop time)."""
        total = self.total_for_request()
        total_at = None if total is None else started + total
        first_at = None if self.first_token is None else started + self.first_token
        iterator = aiter(chunks)
        first = True
        try:
            while True:
                when = _earliest(total_at, first_at if first else None, self.shutdown_at)
                try:
                    async with asyncio.timeout_at(when) as timer:
                        self._timers.add(timer)
                        try:
                            chunk = await anext(iterator)
                        finally:
                            self._timers.discard(timer)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not timer.expired():
                        raise
                    raise self._expired(started, first, total_at, first_at) from None
                first = False
                yield chunk
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    def _expired(self, started: float, first: bool, total_at: float | None, first_at: float | None) -> Exception:
        now = asyncio.get_running_loop().time()
        cut_by_shutdown = self.shutdown_at is not None and now >= self.shutdown_at - 0.001
        if cut_by_shutdown and (total_at is None or self.shutdown_at <= total_at):
            return ServerShuttingDownError(
                f"the server is shutting down and this answer did not finish within its {self._grace:g} s grace "
                f"period (EMBER_SHUTDOWN_GRACE); it was stopped after {now - started:.1f} s: send the request "
                "again once the server is back"
            )
        if first and first_at is not None and (total_at is None or first_at <= total_at):
            return ResponseTimeoutError(
                f"no first token within {self.first_token:g} s (EMBER_FIRST_TOKEN_TIMEOUT); the request was "
                "cancelled: try again when the server is less busy, or use a shorter prompt"
            )
        limit = (total_at or now) - started
        return ResponseTimeoutError(
            f"the answer took longer than its total timeout of {limit:g} s and was cancelled; ask for fewer tokens "
            '(num_predict / max_tokens) or a longer timeout ("timeout" in the body, or the X-Ember-Timeout header)'
        )
