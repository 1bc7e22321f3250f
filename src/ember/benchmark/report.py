"""Benchmark results as rich tables (llama-bench's columns for local mode) and as PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ember.benchmark.local import LocalReport


def format_size(size_bytes: int) -> str:
    """As llama-bench prints a model's size.

    >>> format_size(96576768)
    '92.10 MiB'
    """
    if size_bytes >= 1 << 30:
        return f"{size_bytes / (1 << 30):.2f} GiB"
    return f"{size_bytes / (1 << 20):.2f} MiB"


def format_params(n_params: int) -> str:
    """As llama-bench prints a parameter count.

    >>> format_params(134515008), format_params(7_241_732_096)
    ('134.52 M', '7.24 B')
    """
    return f"{n_params / 1e9:.2f} B" if n_params >= 1e9 else f"{n_params / 1e6:.2f} M"


def local_table(report: LocalReport) -> Table:
    table = Table(title=f"ember bench: {report.model} ({report.repetitions} repetitions)", title_justify="left")
    for name in ("model", "size", "params", "threads", "n_batch", "test"):
        table.add_column(name, justify="left" if name in ("model", "test") else "right")
    table.add_column("t/s", justify="right")
    for result in report.results:
        table.add_row(
            report.description,
            format_size(report.size_bytes),
            format_params(report.n_params),
            str(result.threads),
            str(result.n_batch),
            result.test,
            f"{result.avg_ts:.2f} ± {result.stddev_ts:.2f}",
        )
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f}"


def serving_table(document: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"ember bench --serve {document['url']} ({document['api']} {document['endpoint']}, "
            f"model {document['model']}, max {document['max_tokens']} tokens, "
            f"{document['requests_per_level']} requests per level)"
        ),
        title_justify="left",
    )
    levels = document["levels"]
    by_rate = [level["rate"] is not None for level in levels]
    heading = "rate (req/s)" if all(by_rate) else "concurrency" if not any(by_rate) else "level"
    table.add_column(heading, justify="right")
    for name in ("tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "E2E p50/p90/p99 ms", "errors"):
        table.add_column(name, justify="right")
    for level in levels:
        if level["rate"] is not None:
            name = f"{level['rate']:g}" if heading != "level" else f"{level['rate']:g} req/s"
        else:
            name = str(level["concurrency"]) if heading != "level" else f"{level['concurrency']} at once"
        table.add_row(
            name,
            f"{level['throughput_tok_s']:.1f}",
            f"{level['requests_per_s']:.2f}",
            *(" / ".join(_ms(level[key][q]) for q in ("p50", "p90", "p99")) for key in ("ttft_s", "itl_s", "e2e_s")),
            str(level["errors"]),
        )
    return table


def print_errors(document: dict[str, Any], console: Console) -> None:
    for level in document["levels"]:
        if level["first_error"]:
            where = f"concurrency {level['concurrency']}" if level["concurrency"] else f"rate {level['rate']:g}/s"
            console.print(f"{where}: {level['errors']} failed; first: {level['first_error']}", markup=False)


def plot_local(report: LocalReport, path: Path) -> None:
    """t/s per test (mean, with the standard deviation as an error bar), one bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [f"{r.test}\nt{r.threads} b{r.n_batch}" for r in report.results]
    figure, axes = pyplot.subplots(figsize=(max(7.0, 0.9 * len(labels) + 2), 4.5))
    colours = ["tab:blue" if r.test.startswith("pp") else "tab:orange" for r in report.results]
    axes.bar(
        labels, [r.avg_ts for r in report.results], yerr=[r.stddev_ts for r in report.results], color=colours, capsize=4
    )
    axes.set_ylabel("tokens/s")
    axes.set_title(f"{report.model}: pp (blue), tg (orange); t threads, b n_batch", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot.close(figure)


def plot_serving(document: dict[str, Any], path: Path) -> None:
    """Throughput and TTFT p50 against concurrency (or request rate)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4))
    for key, label in (("concurrency", "concurrency"), ("rate", "request rate (req/s)")):
        levels = [level for level in document["levels"] if level[key] is not None]
        if not levels:
            continue
        xs = [level[key] for level in levels]
        ttft = [level["ttft_s"]["p50"] for level in levels]
        marker = "o-" if key == "concurrency" else "s--"
        left.plot(xs, [level["throughput_tok_s"] for level in levels], marker, label=label)
        right.plot(xs, [math.nan if v is None else v * 1000 for v in ttft], marker, label=label)
    left.set_xlabel("concurrency / request rate")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    right.set_xlabel("concurrency / request rate")
    right.set_ylabel("TTFT p50 (ms)")
    right.set_title("time to first token")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
        axes.legend()
    figure.suptitle(f"ember bench --serve {document['url']} ({document['model']})")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot.close(figure)
