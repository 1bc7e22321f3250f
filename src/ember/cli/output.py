"""Terminal output shared by commands: durations and the timing summary of `--verbose`."""

from __future__ import annotations

from typing import TextIO

from ember.types import Metrics


def format_duration(nanoseconds: int) -> str:
    """A duration the way Go (and so Ollama) prints one: 1.234567s, 12.345ms, 850µs.

    >>> format_duration(1_234_567_000), format_duration(12_345_000), format_duration(850_000)
    ('1.234567s', '12.345ms', '850µs')
    """
    for unit, size in (("s", 1_000_000_000), ("ms", 1_000_000), ("µs", 1_000)):
        if nanoseconds >= size:
            return f"{nanoseconds / size:.6f}".rstrip("0").rstrip(".") + unit
    return f"{nanoseconds}ns"


def print_metrics(metrics: Metrics, stream: TextIO) -> None:
    """Ollama's `--verbose` summary."""
    lines = [
        ("total duration", format_duration(metrics.total_duration)),
        ("load duration", format_duration(metrics.load_duration)),
        ("prompt eval count", f"{metrics.prompt_eval_count} token(s)"),
        ("prompt eval duration", format_duration(metrics.prompt_eval_duration)),
        ("prompt eval rate", f"{metrics.prompt_eval_rate:.2f} tokens/s"),
        ("eval count", f"{metrics.eval_count} token(s)"),
        ("eval duration", format_duration(metrics.eval_duration)),
        ("eval rate", f"{metrics.eval_rate:.2f} tokens/s"),
    ]
    for label, value in lines:
        print(f"{label + ':':<22}{value}", file=stream)
