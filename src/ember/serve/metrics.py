"""The server's numbers for Prometheus (GET /metrics), through prometheus-client.

Counters and histograms move as requests are served (the manager and the request middleware call in here);
gauges (queue depth, slots, KV cells, RSS per runner, GPU readings) are read at scrape time from the manager
and from what each runner last reported over its pipe (runner/protocol.py `RunnerStats`), so a scrape never
waits on a runner. Each app has its own registry: two servers in one process (tests) count apart.

GPU numbers come from NVML (nvidia-ml-py, imported as `pynvml`) and appear only when NVML reports a device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


TTFT_WINDOW = 300.0  # seconds over which the alerts' TTFT p95 rule looks


class RecentLatencies:
    """Times to first token of the last TTFT_WINDOW seconds, for the p95 rule."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, seconds: float) -> None:
        self.samples.append((self.clock(), seconds))
        self._trim()

    def _trim(self) -> None:
        horizon = self.clock() - TTFT_WINDOW
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()

    def p95(self) -> float | None:
        self._trim()
        if not self.samples:
            return None
        values = sorted(value for _, value in self.samples)
        return values[max(0, math.ceil(0.95 * len(values)) - 1)]  # nearest rank


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recent_ttft = RecentLatencies()  # for the alerts' p95 rule (a histogram has no time window)

        def counter(name: str, text: str, labels: tuple[str, ...] = ("model",)) -> Counter:
            return Counter(name, text, list(labels), registry=self.registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, text, ["model"], buckets=buckets, registry=self.registry)

        self.requests = counter("ember_requests", "HTTP requests by route and status.", ("route", "method", "status"))
        self.prompt_tokens = counter("ember_prompt_tokens", "Prompt tokens evaluated.")
        self.generated_tokens = counter("ember_generated_tokens", "Tokens generated.")
        self.cached_tokens = counter("ember_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the cache.")
        self.ttft = histogram(
            "ember_time_to_first_token_seconds",
            "From the model being ready for the request (queue wait included) to its first chunk.",
        )
        self.inter_token = histogram(
            "ember_inter_token_latency_seconds",
            "Mean time between generated tokens, one observation per completion.",
            _TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "ember_request_latency_seconds",
            "End-to-end time of a request on a model, queue wait and generation (loading apart).",
        )
        self.queue_wait = histogram("ember_queue_wait_seconds", "Time waited for a free slot.")
        self.load_time = histogram("ember_model_load_seconds", "Time to load a model.")
        self.loads = counter("ember_model_loads", "Models loaded.")
        self.unloads = counter("ember_model_unloads", "Models unloaded (any reason).")
        self.evictions = counter("ember_model_evictions", "Models unloaded to make room for another.")
        self.crashes = counter("ember_runner_crashes", "Runner processes that died unexpectedly.")
        self.restarts = counter("ember_runner_restarts", "Runners started again after a crash.")
        self.timeouts = counter("ember_request_timeouts", "Answers cut by a timeout.", ("model", "kind"))
        self.cache_hits = counter("ember_response_cache_hits", "Requests answered from the response cache.")

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method, str(status)).inc()

    def observe_final(self, model: str, final: Any) -> None:
        """A completion's last chunk: its token counts and its mean inter-token latency."""
        self.prompt_tokens.labels(model).inc(getattr(final, "prompt_eval_count", 0) or 0)
        self.cached_tokens.labels(model).inc(getattr(final, "prompt_cached_count", 0) or 0)
        count = getattr(final, "eval_count", 0) or 0
        self.generated_tokens.labels(model).inc(count)
        duration = getattr(final, "eval_duration", 0) or 0
        if count > 1 and duration > 0:
            self.inter_token.labels(model).observe(duration / 1e9 / count)

    def watch(self, manager: Any, gpus: Callable[[], list[dict[str, float]]] | None = None) -> None:
        """Read the manager's state (and the GPUs) at each scrape."""
        self.registry.register(_StateCollector(manager, gpus or nvml_readings))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, manager: Any, gpus: Callable[[], list[dict[str, float]]]) -> None:
        self.manager = manager
        self.gpus = gpus

    def collect(self) -> Iterator[Metric]:
        families = {
            "queue": GaugeMetricFamily("ember_queue_depth", "Requests waiting for a slot.", labels=["model"]),
            "busy": GaugeMetricFamily("ember_slots_busy", "Slots decoding a request now.", labels=["model"]),
            "slots": GaugeMetricFamily("ember_slots_total", "Slots of the loaded model.", labels=["model"]),
            "kv": GaugeMetricFamily("ember_kv_cells_used", "KV cache cells holding tokens.", labels=["model"]),
            "kv_total": GaugeMetricFamily("ember_kv_cells_total", "KV cache cells in all.", labels=["model"]),
            "rss": GaugeMetricFamily("ember_runner_rss_bytes", "Resident memory of the runner.", labels=["model"]),
        }
        circuit = GaugeMetricFamily("ember_circuit_open", "1 while the model's circuit is open.", labels=["model"])
        for name, entry in list(self.manager.entries.items()):
            families["queue"].add_metric([name], entry.queue.queued)
            families["busy"].add_metric([name], entry.queue.in_use)
            families["slots"].add_metric([name], entry.queue.slots)
            stats = getattr(entry.runner, "stats", None)
            if stats is not None:
                families["kv"].add_metric([name], stats.kv_cells_used)
                families["kv_total"].add_metric([name], stats.kv_cells_total)
                families["rss"].add_metric([name], stats.rss_bytes)
        breakers = getattr(self.manager, "breakers", None)
        if breakers is not None:
            for name, breaker in list(breakers.circuits.items()):
                circuit.add_metric([name], 1.0 if breaker.is_open() else 0.0)
        yield from families.values()
        yield circuit
        readings = self.gpus()
        if not readings:
            return  # no GPU (or no NVML): no GPU metrics at all, rather than zeros that look like readings
        gpu = {
            key: GaugeMetricFamily(f"ember_gpu_{key}", help_text, labels=["gpu", "name"])
            for key, help_text in (
                ("utilization_ratio", "GPU busy fraction over the last sample period (0-1)."),
                ("memory_used_bytes", "GPU memory in use."),
                ("memory_total_bytes", "GPU memory in all."),
                ("temperature_celsius", "GPU temperature."),
                ("power_watts", "GPU power draw."),
            )
        }
        for reading in readings:
            labels = [str(reading["index"]), str(reading["name"])]
            for key, family in gpu.items():
                if key in reading:
                    family.add_metric(labels, reading[key])
        yield from gpu.values()


def nvml_readings() -> list[dict[str, Any]]:
    """One dict per GPU that NVML reports; [] without NVML, its driver, or a device."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver, no device (every machine without an NVIDIA GPU)
        return []
    readings: list[dict[str, Any]] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            reading: dict[str, Any] = {"index": index, "name": name.decode() if isinstance(name, bytes) else name}
            for key, read in (
                ("utilization_ratio", lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                ("memory_used_bytes", lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used),
                ("memory_total_bytes", lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).total),
                ("temperature_celsius", lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                ("power_watts", lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:  # a reading a device does not support (power on some boards) is left out, not zero
                    reading[key] = float(read(handle))
                except Exception:
                    continue
            readings.append(reading)
    except Exception:
        log.warning("reading the GPUs through NVML failed", exc_info=True)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return readings
