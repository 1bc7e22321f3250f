"""Starting a model's runner, and what the server notes of loads, unloads and crashes (events, metrics)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ember.errors import ModelLoadError
from ember.options import LoadOptions
from ember.serve.circuit import CircuitBreakers
from ember.serve.entries import LoadedModelEntry, Runner
from ember.serve.events import ServerEvents
from ember.serve.metrics import ServeMetrics
from ember.store.resolve import ModelSource

log = logging.getLogger(__name__)

RunnerFactory = Callable[[ModelSource, LoadOptions], Runner]


async def start_with_retries(
    factory: RunnerFactory,
    name: str,
    source: ModelSource,
    options: LoadOptions,
    retries: int,
    backoff: float,
    events: ServerEvents,
) -> Runner:
    """A started runner; a load that failed for a transient reason (its process died while loading: killed,
    out of memory for a moment) is tried again after `backoff` seconds, doubling, `retries` times."""
    for attempt in range(retries + 1):
        runner = factory(source, options)
        try:
            await runner.start()
            return runner
        except ModelLoadError as error:
            await runner.stop()
            if not getattr(error, "transient", False) or attempt == retries:
                raise
            delay = backoff * 2**attempt
            log.warning("loading %s failed (%s); trying again in %g s", name, error, delay)
            events.emit("load_retry", model=name, error=str(error), delay=delay)
            await asyncio.sleep(delay)
        except BaseException:
            await runner.stop()
            raise
    raise AssertionError("unreachable")


class Lifecycle:
    """Loads (a restart when the model's last runner crashed), unloads and runner crashes, as server events
    and metrics; a crash also opens the model's circuit."""

    def __init__(self, events: ServerEvents, breakers: CircuitBreakers, metrics: ServeMetrics | None) -> None:
        self.events = events
        self.breakers = breakers
        self.metrics = metrics
        self.crashed: set[str] = set()  # models whose last runner crashed: their next load is a restart

    def loaded(self, entry: LoadedModelEntry) -> None:
        """Note a load, and hear of its runner's crash from now on."""
        seconds = int(entry.runner.facts.get("load_duration", 0)) / 1e9
        restart = entry.name in self.crashed
        self.crashed.discard(entry.name)
        self.events.emit("load", model=entry.name, seconds=round(seconds, 3), note=entry.load_note, restart=restart)
        if self.metrics is not None:
            self.metrics.loads.labels(entry.name).inc()
            self.metrics.load_time.labels(entry.name).observe(seconds)
            if restart:
                self.metrics.restarts.labels(entry.name).inc()

        def crashed(status: str) -> None:
            self.crashed.add(entry.name)
            self.breakers.failed(entry.name, f"its runner stopped unexpectedly ({status})")
            self.events.emit("runner_crash", model=entry.name, status=status)
            if self.metrics is not None:
                self.metrics.crashes.labels(entry.name).inc()

        entry.runner.on_crash = crashed

    def unloaded(self, entry: LoadedModelEntry, reason: str) -> None:
        self.events.emit("unload", model=entry.name, reason=reason)
        if self.metrics is not None:
            self.metrics.unloads.labels(entry.name).inc()
            if reason.startswith("evicted"):
                self.metrics.evictions.labels(entry.name).inc()
