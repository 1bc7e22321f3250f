"""`ember bench`: llama-bench's pp/tg tests through ember's engine, or a load test of a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.errors import InvalidRequestError

SERVE = "Serving mode (--serve URL)"
LOCAL = "Local mode (MODEL)"
OUTPUT = "Output"

EPILOG = (
    "Local mode loads MODEL in this process once per (threads, n_batch) pair and runs each test once as a "
    "warm-up, then --repetitions times, clearing the prefix cache before each run; t/s is the mean ± sample "
    "standard deviation. pp N prefills N prompt tokens; tg N decodes N tokens greedily from a short prompt.\n\n"
    "Serving mode sends streamed requests with fixed prompts to a running ember (or any OpenAI-compatible "
    "server, or an Ollama API with --api ollama), one level at a time: --concurrency C keeps C requests in "
    "flight, --rate R sends R requests a second on average (Poisson arrivals). One warm-up request comes first "
    "and is not counted. TTFT: time to the first streamed text; ITL: the gaps between streamed chunks; E2E: "
    "the whole request.\n\n"
    "Examples: `ember bench smollm2 -p 128,512 -n 64 -t 1,2`; "
    "`ember bench --serve http://127.0.0.1:11434 --model smollm2 --concurrency 1,2,4 --plot serve.png`"
)


def register(app: typer.Typer) -> None:
    app.command("bench", epilog=EPILOG)(bench)


def bench(
    model: Annotated[
        str | None, typer.Argument(help="Model to load and measure in this process (name or .gguf path).")
    ] = None,
    n_prompt: Annotated[
        str,
        typer.Option(
            "--n-prompt", "-p", help="Prompt lengths to test (pp), comma list; 0: none.", rich_help_panel=LOCAL
        ),
    ] = "512",
    n_gen: Annotated[
        str, typer.Option("--n-gen", "-n", help="Tokens to generate (tg), comma list; 0: none.", rich_help_panel=LOCAL)
    ] = "128",
    repetitions: Annotated[
        int,
        typer.Option(
            "--repetitions", "-r", min=1, help="Runs of each test (after one warm-up).", rich_help_panel=LOCAL
        ),
    ] = 5,
    threads: Annotated[
        str | None,
        typer.Option(
            "--threads", "-t", help="Thread counts, comma list (default: physical cores).", rich_help_panel=LOCAL
        ),
    ] = None,
    batch_size: Annotated[
        str, typer.Option("--batch-size", "-b", help="n_batch values, comma list.", rich_help_panel=LOCAL)
    ] = "512",
    whole_batches: Annotated[
        bool,
        typer.Option(
            "--whole-batches",
            help="Prefill in whole n_batch chunks as llama-bench does even when EMBER_DETERMINISTIC is set.",
            rich_help_panel=LOCAL,
        ),
    ] = False,
    serve: Annotated[
        str | None,
        typer.Option(
            "--serve", help="Base URL of a running server, e.g. http://127.0.0.1:11434.", rich_help_panel=SERVE
        ),
    ] = None,
    api: Annotated[
        str,
        typer.Option(
            "--api", help="openai (/v1, server-sent events) or ollama (/api/generate, NDJSON).", rich_help_panel=SERVE
        ),
    ] = "openai",
    endpoint: Annotated[
        str,
        typer.Option(
            "--endpoint", help="With --api openai: chat (/v1/chat/completions) or completions.", rich_help_panel=SERVE
        ),
    ] = "chat",
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model name to request (default: the first the server lists).", rich_help_panel=SERVE
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(
            "--concurrency", help="Requests in flight per level, comma list (default 1,2,4,8).", rich_help_panel=SERVE
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            "--rate", help="Requests per second per level (Poisson arrivals), comma list.", rich_help_panel=SERVE
        ),
    ] = None,
    requests: Annotated[int, typer.Option("--requests", min=1, help="Requests per level.", rich_help_panel=SERVE)] = 16,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most tokens each request generates.", rich_help_panel=SERVE)
    ] = 64,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Sent as a Bearer token.", rich_help_panel=SERVE)
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of a table.", rich_help_panel=OUTPUT)
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also write a PNG plot of the results to this file.", rich_help_panel=OUTPUT),
    ] = None,
) -> None:
    """Measure speed: llama-bench's pp/tg tests on MODEL in this process, or load a running server (--serve URL)."""
    from rich.console import Console

    from ember.benchmark import report
    from ember.benchmark.stats import float_list, int_list

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = 200  # piped or captured: the table at its natural width, not wrapped at 80 columns
    progress = _progress if sys.stderr.isatty() and not json_output else None
    if plot is not None and plot.suffix.lower() != ".png":
        raise InvalidRequestError(f"--plot writes a PNG; give a file name ending in .png, not {plot.name!r}")
    document: dict[str, Any]
    if serve is not None:
        from ember.benchmark.serving import APIS, ENDPOINTS, Target, run_serving

        if not serve.startswith(("http://", "https://")):
            raise InvalidRequestError(f"--serve takes a URL starting with http:// or https://, got {serve!r}")
        if api not in APIS:
            raise InvalidRequestError(f"--api is one of {', '.join(APIS)}, got {api!r}")
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"--endpoint is one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        levels = int_list(concurrency, "--concurrency") if concurrency else []
        rates = float_list(rate, "--rate") if rate else []
        if not levels and not rates:
            levels = [1, 2, 4, 8]
        target = Target(serve.rstrip("/"), api, endpoint, model_name or model, max_tokens, api_key)
        document = run_serving(target, concurrency=levels, rates=rates, requests=requests, progress=progress)
        if plot is not None:
            report.plot_serving(document, plot)
        if json_output:
            print(json.dumps(document, indent=2))
        else:
            console.print(report.serving_table(document))
            report.print_errors(document, console)
    else:
        if model is None:
            raise InvalidRequestError(
                "give a MODEL to measure in this process, or --serve URL to load a running server"
            )
        from ember.benchmark.local import run_local
        from ember.engine.llamacpp import physical_cores

        prompts = int_list(n_prompt, "--n-prompt", zero_means_none=True)
        gens = int_list(n_gen, "--n-gen", zero_means_none=True)
        if not prompts and not gens:
            raise InvalidRequestError("nothing to measure: --n-prompt and --n-gen are both 0")
        results = run_local(
            model,
            n_prompt=prompts,
            n_gen=gens,
            repetitions=repetitions,
            threads=int_list(threads, "--threads") if threads else [physical_cores()],
            batch_sizes=int_list(batch_size, "--batch-size"),
            whole_batches=whole_batches,
            progress=progress,
        )
        if plot is not None:
            report.plot_local(results, plot)
        if json_output:
            print(json.dumps(results.as_dict(), indent=2))
        else:
            console.print(report.local_table(results))
    if plot is not None and not json_output:
        console.print(f"plot written to {plot}", markup=False)


def _progress(message: str) -> None:
    print(f"ember bench: {message}", file=sys.stderr, flush=True)
