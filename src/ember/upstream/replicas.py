"""The replicas of an upstream model: which one takes the next request, and which ones are up.

A request goes to the healthy replica with the fewest requests in flight (ties: the one listed first). A
replica that refuses a connection, or answers 5xx before its first token, is marked down; a background task
asks each down replica's `GET /models` again after a backoff (1 s, doubling, at most `max_backoff`) and each
healthy one every `interval` seconds, so a replica that comes back takes requests again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)


@dataclass
class Replica:
    url: str  # the OpenAI base URL, ending in /v1
    healthy: bool = True
    outstanding: int = 0
    failures: int = 0  # in a row
    error: str | None = None
    next_check: float = 0.0  # monotonic
    checked_at: float | None = None  # wall clock of the last health check
    max_model_len: int | None = None  # vLLM's /v1/models tells it

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "error": self.error,
            "checked_at": self.checked_at,
        }


class ReplicaPool:
    """Use from one event loop."""

    def __init__(
        self,
        urls: tuple[str, ...],
        client: httpx.AsyncClient,
        headers: dict[str, str],
        model: str,
        *,
        interval: float = 10.0,
        base_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.replicas = [Replica(url) for url in urls]
        self.client = client
        self.headers = headers
        self.model = model
        self.interval = interval
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def choose(self, exclude: set[str]) -> Replica | None:
        """The healthy replica with the fewest requests in flight; when none is healthy, a down one not tried
        yet (it may be back before its next check). None when every replica has been tried."""
        candidates = [replica for replica in self.replicas if replica.url not in exclude]
        healthy = [replica for replica in candidates if replica.healthy]
        pool = healthy or candidates
        return min(pool, key=lambda replica: replica.outstanding) if pool else None

    def failed(self, replica: Replica, error: str) -> None:
        if replica.healthy:
            log.warning("upstream replica %s is down: %s", replica.url, error)
        self._mark_down(replica, error)
        self._wake.set()

    def _mark_down(self, replica: Replica, error: str) -> None:
        replica.healthy = False
        replica.failures += 1
        replica.error = error
        delay = min(self.base_backoff * 2 ** (replica.failures - 1), self.max_backoff)
        replica.next_check = time.monotonic() + delay

    def _mark_up(self, replica: Replica) -> None:
        if not replica.healthy:
            log.info("upstream replica %s is back", replica.url)
        replica.healthy = True
        replica.failures = 0
        replica.error = None
        replica.next_check = time.monotonic() + self.interval

    async def check(self, replica: Replica) -> bool:
        """Ask the replica's /models (it lists the model when it is up); note the answer."""
        replica.checked_at = time.time()
        try:
            response = await self.client.get(f"{replica.url}/models", headers=self.headers, timeout=5.0)
        except httpx.HTTPError as error:
            self._mark_down(replica, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            return False
        if response.status_code != 200:
            self._mark_down(replica, f"GET /models answered {response.status_code}")
            return False
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            for card in response.json().get("data") or []:
                if card.get("id") == self.model and card.get("max_model_len"):
                    replica.max_model_len = int(card["max_model_len"])
        self._mark_up(replica)
        return True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(replica) for replica in self.replicas))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            now = time.monotonic()
            due = [replica for replica in self.replicas if replica.next_check <= now]
            if due:
                await asyncio.gather(*(self.check(replica) for replica in due))
            soonest = min(replica.next_check for replica in self.replicas) - time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, soonest))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def max_model_len(self) -> int | None:
        return next((replica.max_model_len for replica in self.replicas if replica.max_model_len), None)

    def status(self) -> list[dict[str, Any]]:
        return [replica.status() for replica in self.replicas]
