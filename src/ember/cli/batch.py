"""`ember batch INPUT... [-o OUT]`: many prompts through a model, resumable, with a progress bar.

Inputs: OpenAI batch JSONL (`{custom_id, method, url, body}`), JSONL or CSV of prompts (a `prompt` or
`messages` field or column, other fields per-line options), or text files, folders and globs (one prompt per
file, or per line with --lines). Output: OpenAI's batch output JSONL in input order, or with `--format json`
the guide's `[{prompt, response, ...}]` per input file (-o names a folder then).

Lines run in this process (every slot of the model filled), through a running server (--server), or across a
Ray cluster (--ray). A journal beside the output records each finished line, so running the same command
again after a crash or Ctrl-C continues where it stopped; --retry-failed runs the failed lines again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.cli import flags
from ember.errors import InvalidRequestError

_WHERE = "Where lines run"

EPILOG = (
    "Exit status: 0 when every line succeeded, 2 when some failed (each is in the output with its error), "
    "1 on an error that stopped the run (rerun the same command to continue it).\n\n"
    "Examples: `ember batch prompts.txt --lines -o results.jsonl --temp 0 -n 64`; "
    "`ember batch input/ --format json -o output/`; `ember batch requests.jsonl -o out.jsonl --server`; "
    "`ember batch big.jsonl -o out.jsonl --ray auto`"
)


def register(app: typer.Typer) -> None:
    app.command("batch", epilog=EPILOG)(batch)


def _drop_unset(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def journal_path(out: Path | None, output_format: str, fingerprint: str, home: Path) -> Path:
    """Beside the output (`OUT.journal`, or `.ember-batch.journal` in an output folder), else in EMBER_HOME."""
    if out is None:
        return home / "batch" / f"{fingerprint[:24]}.journal"
    if output_format == "json":
        return out / ".ember-batch.journal"
    return out.with_name(out.name + ".journal")


def batch(
    inputs: Annotated[list[str], typer.Argument(help="Input files, folders or globs.", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (a folder with --format json); default stdout.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="jsonl (OpenAI batch output) or json (per input file).")
    ] = "jsonl",
    per_line: Annotated[bool, typer.Option("--lines", help="Text inputs: one prompt per line, not per file.")] = False,
    model: Annotated[str | None, typer.Option("-m", "--model", help="Model (replaces the one lines name).")] = None,
    system: Annotated[str | None, typer.Option("--system", "-sys", help="System prompt for prompt inputs.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run the lines that failed again.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Forget the journal of an earlier run.")] = False,
    server: Annotated[
        bool, typer.Option("--server", help="Run through the ember server at EMBER_HOST.", rich_help_panel=_WHERE)
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray", help="Spread over a Ray cluster: auto, or its ADDRESS.", rich_help_panel=_WHERE),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option("--ray-actors", min=1, help="Actors (default: one per node).", rich_help_panel=_WHERE),
    ] = None,
    ray_ship: Annotated[
        bool,
        typer.Option(
            "--ray-ship",
            help="Send the model through Ray's object store even to nodes that see its path.",
            rich_help_panel=_WHERE,
        ),
    ] = False,
    parallel: Annotated[
        int | None,
        typer.Option("-np", "--parallel", min=1, help="Lines in flight (slots per model).", rich_help_panel=_WHERE),
    ] = None,
    n_predict: flags.NPredict = None,
    temperature: flags.Temperature = None,
    top_k: flags.TopK = None,
    top_p: flags.TopP = None,
    min_p: flags.MinP = None,
    typical_p: flags.TypicalP = None,
    repeat_penalty: flags.RepeatPenalty = None,
    repeat_last_n: flags.RepeatLastN = None,
    presence_penalty: flags.PresencePenalty = None,
    frequency_penalty: flags.FrequencyPenalty = None,
    seed: flags.Seed = None,
    stop: flags.Stop = None,
    ctx_size: flags.CtxSize = None,
    gpu_layers: flags.GpuLayers = None,
    threads: flags.Threads = None,
    batch_size: flags.BatchSize = None,
) -> int:
    """Run many prompts or OpenAI batch requests; resumable, results in input order."""
    from ember.config import Settings
    from ember.jobs.batch_input import PromptDefaults, read_inputs
    from ember.jobs.batch_journal import Journal, fingerprint
    from ember.options import resolve_options

    if output_format not in ("jsonl", "json"):
        raise InvalidRequestError(f"--format must be jsonl or json, not {output_format!r}")
    if server and ray_address:
        raise InvalidRequestError("choose one of --server and --ray")
    settings = Settings()
    sampling = _drop_unset(
        {
            "num_predict": n_predict,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "typical_p": typical_p,
            "repeat_penalty": repeat_penalty,
            "repeat_last_n": repeat_last_n,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "seed": seed,
            "stop": stop or None,
        }
    )
    slots = parallel or settings.num_parallel
    load = _drop_unset(
        {
            "num_ctx": ctx_size,
            "num_gpu": gpu_layers,
            "num_thread": threads,
            "num_batch": batch_size,
            "num_parallel": slots,
        }
    )
    resolve_options(load, sampling)  # a bad value fails now, before any model loads
    defaults = PromptDefaults(
        model=model or settings.default_model, system=system, options=sampling, model_override=model is not None
    )
    lines = read_inputs(inputs, defaults, per_line=per_line)
    journal = Journal(journal_path(output, output_format, fingerprint(lines), settings.home), lines, restart=restart)
    pending = journal.pending(lines, retry_failed=retry_failed)
    executor, concurrency = _executor(server, ray_address, ray_actors, ray_ship, load, slots, settings)
    try:
        if ray_address and pending:
            executor.start(pending)
        with BatchProgress(len(lines), journal, pending) as progress:

            def on_result(result: Any) -> None:
                journal.record(result)
                progress.advance(result)

            if pending:
                run_lines_interruptibly(pending, executor, concurrency, on_result)
    finally:
        executor.close()
    from ember.jobs.batch_run import write_outputs

    written = write_outputs(lines, journal, output, output_format)
    failed = sum(not journal.results[line.index].ok for line in lines)
    where = ", ".join(str(path) for path in written) or "stdout"
    print(
        f"{len(lines) - failed} of {len(lines)} line(s) succeeded, {failed} failed"
        f"{f' ({len(lines) - len(pending)} done earlier)' if len(pending) < len(lines) else ''}; output: {where}",
        file=sys.stderr,
    )
    return 2 if failed else 0


def _executor(
    server: bool,
    ray_address: str | None,
    ray_actors: int | None,
    ray_ship: bool,
    load: dict[str, Any],
    slots: int,
    settings: Any,
) -> tuple[Any, int]:
    from ember.api.openai_calls import native_call
    from ember.jobs.batch_run import ManagerExecutor, ServerExecutor

    if server:
        keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        return ServerExecutor(settings.base_url, headers), slots
    if ray_address:
        from ember.jobs.batch_ray import RayExecutor

        executor = RayExecutor(ray_address, native_call, load, actors=ray_actors, ship=ray_ship)
        return executor, executor.concurrency
    return ManagerExecutor(native_call, settings, load, slots), slots


def run_lines_interruptibly(pending: list[Any], executor: Any, concurrency: int, on_result: Any) -> None:
    """Run the lines; on Ctrl-C start no new one and let those in flight finish (they are journaled), so the
    model is never closed under a running line; a second Ctrl-C quits at once."""
    from ember.jobs.batch_run import run_lines

    failure: list[BaseException] = []
    stop, finished = threading.Event(), threading.Event()

    def drive() -> None:
        try:
            run_lines(pending, executor, concurrency=concurrency, on_result=on_result, stop=stop)
        except BaseException as error:
            failure.append(error)
        finally:
            finished.set()

    # The driver runs in a thread so the main thread stays free for Ctrl-C. It waits on an Event, not on
    # Thread.join: a join interrupted by Ctrl-C marks the thread as stopped although it still runs.
    threading.Thread(target=drive, name="ember-batch-driver", daemon=True).start()
    try:
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        stop.set()
        print("\nstopping: the lines in flight finish and are kept (Ctrl-C again to quit now)", file=sys.stderr)
        try:
            while not finished.wait(0.2):
                pass
        except KeyboardInterrupt:
            os._exit(130)  # the journal holds every line finished so far
        print("rerun the same command to continue", file=sys.stderr)
        raise
    if failure:
        raise failure[0]


class BatchProgress:
    """A rich progress bar on stderr: done and failed counts, generated tokens per second, time left."""

    def __init__(self, total: int, journal: Any, pending: list[Any]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        again = {line.index for line in pending}
        self.failed = sum(not result.ok for index, result in journal.results.items() if index not in again)
        self.tokens = 0
        self.started = time.monotonic()
        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("batch", total=total, completed=total - len(pending), failed=self.failed)
        self.progress.update(self.task, rate="-")
        self._lock = threading.Lock()

    def __enter__(self) -> BatchProgress:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def advance(self, result: Any) -> None:
        with self._lock:
            self.tokens += result.tokens
            self.failed += 0 if result.ok else 1
            rate = self.tokens / max(1e-9, time.monotonic() - self.started)
            self.progress.update(self.task, advance=1, failed=self.failed, rate=f"{rate:.1f}")
