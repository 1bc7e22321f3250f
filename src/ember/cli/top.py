"""`ember top`: a live view of a running server, refreshed each second; q quits.

It reads what any monitoring system would: /metrics (Prometheus text, parsed with prometheus-client's parser),
/api/ps and /api/errors. Tokens per second and TTFT percentiles are computed from how the counters and
histogram buckets moved over the last minute, so they describe now, not the server's whole life.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from ember.config import Settings

WINDOW = 60.0  # seconds of history behind the rates and percentiles
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def register(app: typer.Typer) -> None:
    app.command("top")(top)


@dataclass
class Snapshot:
    at: float
    samples: Samples
    models: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _by_model(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels).get("model", ""): value for (metric, labels), value in samples.items() if metric == name}


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram given as sorted (upper bound, cumulative count), as Prometheus's
    histogram_quantile computes it (linear within the bucket)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
        lower, below = bound, count
    return lower


def _ttft_buckets(now: Samples, then: Samples | None, model: str) -> list[tuple[float, float]]:
    buckets = []
    for (metric, labels), value in now.items():
        label = dict(labels)
        if metric == "ember_time_to_first_token_seconds_bucket" and label.get("model") == model:
            earlier = then.get((metric, labels), 0.0) if then is not None else 0.0
            buckets.append((float(label["le"]), value - earlier))
    return sorted(buckets)


class Monitor:
    """Fetches snapshots from the server and keeps the last minute of them."""

    def __init__(self, settings: Settings) -> None:
        import httpx

        keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        self.client = httpx.Client(base_url=settings.base_url, headers=headers, timeout=5)
        self.history: deque[Snapshot] = deque()
        self.problem: str | None = None

    def fetch(self) -> Snapshot | None:
        import httpx

        try:
            metrics = self.client.get("/metrics")
            metrics.raise_for_status()
            models = self.client.get("/api/ps").json().get("models", [])
            errors = self.client.get("/api/errors").json().get("errors", [])
        except (httpx.HTTPError, ValueError) as error:
            self.problem = f"cannot read {self.client.base_url}: {error}"
            return None
        self.problem = None
        snapshot = Snapshot(time.monotonic(), parse_metrics(metrics.text), models, errors)
        self.history.append(snapshot)
        while len(self.history) > 2 and self.history[1].at < snapshot.at - WINDOW:
            self.history.popleft()
        return snapshot

    def baseline(self) -> Snapshot | None:
        return self.history[0] if len(self.history) > 1 else None


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def render(monitor: Monitor, snapshot: Snapshot | None, base_url: str) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Text(f"ember top: {base_url}   (q quits)", style="bold")
    if snapshot is None:
        return Group(title, Text(monitor.problem or "waiting for the server...", style="red"))
    samples, then = snapshot.samples, monitor.baseline()
    elapsed = snapshot.at - then.at if then is not None else 0.0
    tokens_now = _by_model(samples, "ember_generated_tokens_total")
    tokens_then = _by_model(then.samples, "ember_generated_tokens_total") if then is not None else {}
    gauges = {
        name: _by_model(samples, name)
        for name in (
            "ember_slots_busy",
            "ember_slots_total",
            "ember_queue_depth",
            "ember_kv_cells_used",
            "ember_kv_cells_total",
            "ember_runner_rss_bytes",
            "ember_circuit_open",
        )
    }
    table = Table(expand=True)
    for column in ("MODEL", "SLOTS", "QUEUE", "TOKENS/S", "TTFT p50", "TTFT p95", "KV CELLS", "MEMORY", "CIRCUIT"):
        table.add_column(column, justify="left" if column == "MODEL" else "right")
    names = [model["name"] for model in snapshot.models]
    names += sorted(name for name in gauges["ember_circuit_open"] if name not in names)
    for name in names:
        rate = (tokens_now.get(name, 0.0) - tokens_then.get(name, 0.0)) / elapsed if elapsed > 0 else None
        recent = _ttft_buckets(samples, then.samples if then is not None else None, name)
        if not recent or recent[-1][1] <= 0:  # nothing in the last minute: the whole life's numbers
            recent = _ttft_buckets(samples, None, name)
        busy, slots = gauges["ember_slots_busy"].get(name), gauges["ember_slots_total"].get(name)
        kv, kv_total = gauges["ember_kv_cells_used"].get(name), gauges["ember_kv_cells_total"].get(name)
        table.add_row(
            name,
            f"{busy:.0f}/{slots:.0f}" if busy is not None and slots is not None else "-",
            f"{gauges['ember_queue_depth'].get(name, 0):.0f}",
            "-" if rate is None else f"{rate:.1f}",
            _ms(quantile(recent, 0.5)),
            _ms(quantile(recent, 0.95)),
            f"{kv:.0f}/{kv_total:.0f}" if kv is not None and kv_total is not None else "-",
            _size(gauges["ember_runner_rss_bytes"].get(name)),
            "OPEN" if gauges["ember_circuit_open"].get(name) else "closed",
        )
    if not names:
        table.add_row("(no model loaded)", *[""] * 8)
    parts: list[Any] = [title, table]
    gpus = [
        (dict(labels), value)
        for (metric, labels), value in samples.items()
        if metric == "ember_gpu_temperature_celsius"
    ]
    if gpus:
        parts.append(Text("GPU  " + "   ".join(f"{g['gpu']} {g['name']}: {v:.0f} °C" for g, v in gpus)))
    else:
        parts.append(Text("GPU  none reported", style="dim"))
    parts.append(Text("Recent errors", style="bold"))
    for error in snapshot.errors[-5:]:
        line = f"{error.get('time', '')}  {error.get('status')}  {error.get('route')}  {error.get('error', '')}"
        parts.append(Text(line[:200], style="red"))
    if not snapshot.errors:
        parts.append(Text("none", style="dim"))
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Single key presses from the terminal (no Enter needed), or nothing when stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    descriptor = sys.stdin.fileno()
    saved = termios.tcgetattr(descriptor)
    try:
        tty.setcbreak(descriptor)
        yield descriptor
    finally:
        termios.tcsetattr(descriptor, termios.TCSADRAIN, saved)


def _wait_for_key(descriptor: int | None, seconds: float) -> str | None:
    if descriptor is None:
        time.sleep(seconds)
        return None
    ready, _, _ = select.select([descriptor], [], [], seconds)
    return os.read(descriptor, 16).decode(errors="replace") if ready else None


def top(
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.2, help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live view of a running server: models, slots, queue, tokens/s, TTFT p50/p95, memory, GPU, errors."""
    from rich.live import Live

    from ember.cli.serving import ServerUnreachableError

    settings = Settings()
    monitor = Monitor(settings)
    if monitor.fetch() is None:
        raise ServerUnreachableError(
            f"could not read an ember server at {settings.base_url} ({monitor.problem}); start one with `ember serve`"
        )
    with _keys() as descriptor, Live(render(monitor, monitor.history[-1], settings.base_url), screen=True) as live:
        while True:
            key = _wait_for_key(descriptor, interval)
            if key is not None and "q" in key.lower():
                break
            live.update(render(monitor, monitor.fetch(), settings.base_url))
