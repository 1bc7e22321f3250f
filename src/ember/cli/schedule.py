"""`ember schedule add | list | run | rm | history`: cron-timed requests that `ember serve` runs.

The schedules live in EMBER_HOME/ember.db; `add`, `list`, `rm` and `history` use it directly (a running server
reads it again within half a minute). `run` goes through a running server when there is one (its loaded
model, at low priority), else runs the request in this process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.config import Settings
from ember.errors import EmberError, InvalidRequestError

schedule_app = typer.Typer(
    help="Run a prompt on a cron schedule inside `ember serve`; list, run, remove, see the history.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule")


def _store() -> Any:
    from ember.jobs.schedule_store import ScheduleStore

    return ScheduleStore(Settings().home / "ember.db")


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def _option(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise InvalidRequestError(f"--option takes NAME=VALUE, such as num_predict=256, not {text!r}")
    try:
        return name.strip(), json.loads(value)
    except ValueError:
        return name.strip(), value


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the schedule.")],
    cron: Annotated[str, typer.Option("--cron", help='When: a cron expression, such as "0 18 * * *".')],
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model (EMBER_DEFAULT_MODEL).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", "-f", help="A file whose text is the prompt (read at each run).")
    ] = None,
    messages: Annotated[
        Path | None, typer.Option("--messages", help="A JSON file of chat messages (read at each run).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="File for the answer: {date}, {time}, {name}, {run} allowed.")
    ] = None,
    webhook: Annotated[str | None, typer.Option("--webhook", help="URL that gets each run as JSON (POST).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    options: Annotated[
        list[str] | None, typer.Option("--option", help="An option NAME=VALUE, such as num_predict=256 (repeatable).")
    ] = None,
    format: Annotated[str | None, typer.Option("--format", help='"json" to have the answer in JSON.')] = None,
    timezone: Annotated[
        str | None, typer.Option("--timezone", help="IANA time zone of the cron expression (default: local time).")
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a schedule of the same name.")] = False,
) -> None:
    """Add a schedule: MODEL answers the prompt at each cron time; the answer goes to --output / --webhook."""
    from ember.jobs.schedules import prepare_spec

    fields: dict[str, Any] = {
        "name": name,
        "cron": cron,
        "model": model or Settings().default_model,
        "prompt": prompt,
        "prompt_file": str(prompt_file) if prompt_file else None,
        "messages_file": str(messages) if messages else None,
        "output": output,
        "webhook": webhook,
        "system": system,
        "options": dict(_option(text) for text in options or ()),
        "format": format,
        "timezone": timezone,
    }
    spec = prepare_spec({k: v for k, v in fields.items() if v is not None}, base=Path.cwd(), confined=False)
    schedule = _store().add(spec, time.time(), replace=replace)
    print(f"added {schedule.name}: next run {_when(schedule.next_run_at)} (runs inside `ember serve`)", file=sys.stderr)


@schedule_app.command("list")
def list_schedules() -> None:
    """The schedules: when each runs next and how its last run went."""
    store = _store()
    rows = [("NAME", "CRON", "MODEL", "NEXT RUN", "LAST RUN")]
    for schedule in store.list():
        runs = store.history(schedule.name, limit=1)
        last = f"{runs[0].status} {_when(runs[0].started_at)}" if runs else "-"
        rows.append((schedule.name, schedule.spec.cron, schedule.spec.model, _when(schedule.next_run_at), last))
    _table(rows)


@schedule_app.command("run")
def run(name: Annotated[str, typer.Argument(help="The schedule to run now.")]) -> None:
    """Run a schedule now (through the running server if there is one); prints the answer."""
    from ember.cli import remote

    result = _run_remote(name) if remote.available() else asyncio.run(_run_here(name))
    print(result.get("response") or "")
    where = ", ".join(result.get("outputs") or []) or "the history"
    duration = result.get("duration") or 0.0
    if result.get("status") != "succeeded":
        raise EmberError(f"run {result.get('id')} of {name} failed after {duration:.1f} s: {result.get('error')}")
    print(f"run {result.get('id')} of {name} succeeded in {duration:.1f} s; output: {where}", file=sys.stderr)


def _run_remote(name: str) -> dict[str, Any]:
    import httpx

    from ember.cli.serving import ServerUnreachableError

    settings = Settings()
    keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    try:  # no read timeout: the run takes as long as the model needs
        response = httpx.post(
            f"{settings.base_url}/api/schedules/{name}/run", headers=headers, timeout=httpx.Timeout(30.0, read=None)
        )
    except httpx.HTTPError as error:
        raise ServerUnreachableError(f"the ember server at {settings.base_url} did not answer: {error}") from None
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code >= 400:
        raise EmberError(str(data.get("error") or f"the server answered {response.status_code}"))
    return data


async def _run_here(name: str) -> dict[str, Any]:
    from ember.api.app import create_manager
    from ember.jobs.answering import ManagerAnswerer
    from ember.jobs.schedules import Scheduler

    answerer = ManagerAnswerer(create_manager(Settings()), owned=True)
    try:
        run = await Scheduler(_store(), answerer).run_now(name)
    finally:
        await answerer.close()
    return run.as_json()


@schedule_app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="The schedule to remove (its history stays).")]) -> None:
    """Remove a schedule."""
    _store().remove(name)
    print(f"removed {name}", file=sys.stderr)


@schedule_app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="The schedule.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON lines, answers included.")] = False,
) -> None:
    """A schedule's latest runs: when, why, status, duration, where the output went, the error."""
    store = _store()
    runs = store.history(name, limit)
    if not runs:
        store.get(name)  # an unknown name is an error; a schedule that never ran has an empty history
    if as_json:
        for entry in runs:
            print(json.dumps(entry.as_json(), ensure_ascii=False))
        return
    rows = [("RUN", "STARTED", "TRIGGER", "STATUS", "DURATION", "OUTPUT")]
    for entry in runs:
        duration = f"{entry.duration:.1f} s" if entry.duration is not None else "-"
        where = ", ".join(entry.outputs) or (entry.error or "-")
        if entry.error and entry.outputs:
            where += f" ({entry.error})"
        rows.append((str(entry.id), _when(entry.started_at), entry.trigger, entry.status, duration, where))
    _table(rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("    ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
