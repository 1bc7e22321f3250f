"""Scheduled jobs: cron-timed requests that `ember serve` runs at low priority, each run recorded.

    scheduler = Scheduler(ScheduleStore(), ManagerAnswerer(manager, owned=False))
    await scheduler.start()     # fires what was missed while no server ran (once each), then keeps time
    await scheduler.run_now("daily-summary")
    await scheduler.stop()

The clock is injected (`clock`, epoch seconds), so tests move time instead of waiting for it. A schedule's next
time is stored; `tick()` runs every schedule whose time has come and moves it to its next time after *now*,
so however many times were missed, a schedule fires once (coalesced). A run writes the answer to its output
file (a path template: {date}, {time}, {datetime}, {name}, {run}), POSTs its record to its webhook, and is
recorded with its status, duration and where its output went. A failed run calls `scheduled_run_failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ember.collect import collect_async
from ember.errors import EmberError, InvalidRequestError
from ember.jobs.answering import Answerer, ManagerAnswerer
from ember.jobs.schedule_store import (
    Schedule,
    ScheduleRun,
    ScheduleSpec,
    ScheduleStore,
    Trigger,
    build_spec,
    next_fire_time,
    zone,
)
from ember.serve.manager import ModelManager
from ember.types import ChatRequest, ChatResponse, GenerateRequest, build_request, to_messages

log = logging.getLogger(__name__)
SCHEDULE_PRIORITY = "low"  # scheduled work yields to interactive requests
MISSED_AFTER_S = 60.0  # a run that starts this late stands for a time that passed while nothing ran
POLL_S = 30.0  # the store is read again at least this often (schedules added by other processes)
WEBHOOK_TIMEOUT_S = 10.0

FailureHook = Callable[[ScheduleSpec, ScheduleRun], None]


def scheduled_run_failed(spec: ScheduleSpec, run: ScheduleRun) -> None:
    """The hook for "a scheduled run failed". Monitoring's alerts connect here (the scheduler's `on_failure`);
    until they exist, the failure is logged as a warning (and the run's webhook, if any, got the record)."""
    log.warning("scheduled run %d of %r failed: %s", run.id, spec.name, run.error)


class Scheduler:
    """Runs a ScheduleStore's schedules on time through an Answerer. Use from one event loop."""

    def __init__(
        self,
        store: ScheduleStore,
        answerer: Answerer,
        *,
        clock: Callable[[], float] = time.time,
        on_failure: FailureHook = scheduled_run_failed,
        poll_seconds: float = POLL_S,
    ) -> None:
        self.store = store
        self.answerer = answerer
        self.clock = clock
        self.on_failure = on_failure
        self.poll_seconds = poll_seconds
        self._running: dict[str, asyncio.Task[ScheduleRun]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Record runs a stopped process left unfinished, fire what is due (missed runs once), keep time."""
        try:
            for run in await asyncio.to_thread(self.store.mark_interrupted, self.clock()):
                log.warning("scheduled run %d of %r was interrupted when its process stopped", run.id, run.schedule)
                with contextlib.suppress(EmberError):  # a schedule removed since has nobody to tell
                    self._report_failure((await asyncio.to_thread(self.store.get, run.schedule)).spec, run)
            await self.tick()
        except EmberError as error:  # a damaged database must not keep the server from starting
            log.error("the schedules cannot be read: %s", error)
        self._loop_task = asyncio.create_task(self._keep_time())

    async def stop(self) -> None:
        """Stop keeping time; runs in progress are cancelled and recorded as interrupted."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        runs = list(self._running.values())
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    def wake(self) -> None:
        """Look at the store again now (a schedule was added or removed)."""
        self._wake.set()

    async def idle(self) -> None:
        """Wait until no run is in progress."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _keep_time(self) -> None:
        while True:
            schedules = await asyncio.to_thread(self.store.list)
            now = self.clock()
            wait = min([s.next_run_at - now for s in schedules] + [self.poll_seconds])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, wait))
            self._wake.clear()
            try:
                await self.tick()
            except EmberError as error:  # the database failed: say so and try again later
                log.warning("the scheduler could not read its schedules: %s", error)

    # --- firing --------------------------------------------------------------------------------------

    async def tick(self) -> list[asyncio.Task[ScheduleRun]]:
        """Start every schedule whose time has come; returns the runs started."""
        now = self.clock()
        started = []
        for schedule in await asyncio.to_thread(self.store.list):
            if schedule.next_run_at > now:
                continue
            following = next_fire_time(schedule.spec.cron, now, schedule.spec.timezone)
            if not await asyncio.to_thread(self.store.claim_due, schedule.name, schedule.next_run_at, following):
                continue  # another scheduler on this database took it
            if schedule.name in self._running:
                log.warning("%r is still running from its last time; this time is skipped", schedule.name)
                continue
            trigger: Trigger = "missed" if now - schedule.next_run_at > MISSED_AFTER_S else "cron"
            started.append(self._launch(schedule.spec, trigger, schedule.next_run_at))
        return started

    async def run_now(self, name: str) -> ScheduleRun:
        """Run a schedule at once (its cron times are unchanged) and return the finished run."""
        schedule = await asyncio.to_thread(self.store.get, name)
        if name in self._running:
            raise InvalidRequestError(f"{name!r} is running already; see `ember schedule history {name}`")
        return await self._launch(schedule.spec, "manual", None)

    def _launch(self, spec: ScheduleSpec, trigger: Trigger, scheduled_for: float | None) -> asyncio.Task[ScheduleRun]:
        task = asyncio.create_task(self._execute(spec, trigger, scheduled_for))
        self._running[spec.name] = task
        task.add_done_callback(lambda _: self._running.pop(spec.name, None))
        return task

    async def _execute(self, spec: ScheduleSpec, trigger: Trigger, scheduled_for: float | None) -> ScheduleRun:
        run = await asyncio.to_thread(self.store.start_run, spec.name, trigger, scheduled_for, self.clock())
        started = time.monotonic()
        try:
            request = await asyncio.to_thread(request_for, spec)
            chunks = self.answerer.answer(request, priority=SCHEDULE_PRIORITY)
            answer = await collect_async(chunks)
            run.response = answer.message.content if isinstance(answer, ChatResponse) else answer.response
            if spec.output:
                path = output_path(spec.output, spec, run.id, self.clock())
                await asyncio.to_thread(_write_atomically, path, run.response)
                run.outputs.append(str(path))
            run.status = "succeeded"
        except asyncio.CancelledError:
            run.status, run.error = "interrupted", "the server stopped during this run"
            run.finished_at, run.duration = self.clock(), time.monotonic() - started
            await asyncio.shield(asyncio.to_thread(self.store.finish_run, run))
            raise
        except Exception as error:  # any failure is the run's: recorded, never the scheduler's end
            run.status, run.error = "failed", _describe(error)
        if spec.webhook:
            await self._notify(spec, run)
        run.finished_at, run.duration = self.clock(), time.monotonic() - started
        await asyncio.to_thread(self.store.finish_run, run)
        if run.status == "failed":
            self._report_failure(spec, run)
        return run

    def _report_failure(self, spec: ScheduleSpec, run: ScheduleRun) -> None:
        try:
            self.on_failure(spec, run)
        except Exception:  # an alert that fails must not stop the schedules
            log.exception("the failure hook for %r failed", spec.name)

    async def _notify(self, spec: ScheduleSpec, run: ScheduleRun) -> None:
        """POST the run's record to the webhook; a webhook that fails makes the run fail (its output stays)."""
        import httpx

        assert spec.webhook is not None
        body = {"schedule": spec.name, "model": spec.model, **run.as_json(), "status": run.status}
        try:
            async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
                response = await client.post(spec.webhook, json=body)
            if response.status_code >= 400:
                raise EmberError(f"the webhook {spec.webhook} answered {response.status_code}")
            run.outputs.append(spec.webhook)
        except (httpx.HTTPError, EmberError) as error:
            problem = f"the webhook {spec.webhook} failed: {_describe(error)}"
            run.error = f"{run.error}; {problem}" if run.error else problem
            run.status = "failed"


def server_scheduler(home: Path, manager: ModelManager) -> Scheduler:
    """The scheduler of `ember serve`: the schedules in EMBER_HOME/ember.db, answered by the server's manager."""
    return Scheduler(ScheduleStore(home / "ember.db"), ManagerAnswerer(manager, owned=False))


def request_for(spec: ScheduleSpec) -> ChatRequest | GenerateRequest:
    """The native request of a run; prompt and messages files are read now, so edits count from the next run."""
    common: dict[str, Any] = {"model": spec.model, "options": dict(spec.options) or None, "format": spec.format}
    if spec.prompt is not None or spec.prompt_file is not None:
        prompt = spec.prompt if spec.prompt is not None else _read(spec.prompt_file, "prompt file")
        if not prompt.strip():
            raise InvalidRequestError(f"the prompt file {spec.prompt_file} is empty")
        return build_request(GenerateRequest, prompt=prompt, system=spec.system, **common)
    if spec.messages is not None:
        messages = spec.messages
    else:
        text = _read(spec.messages_file, "messages file")
        try:
            messages = json.loads(text)
        except ValueError as error:
            raise InvalidRequestError(f"the messages file {spec.messages_file} is not JSON: {error}") from None
    checked = [m.model_dump(exclude_none=True) for m in to_messages(messages)]
    if spec.system is not None:
        checked = [{"role": "system", "content": spec.system}, *(m for m in checked if m["role"] != "system")]
    if not checked:
        raise InvalidRequestError(f"the messages of {spec.name!r} are empty")
    return build_request(ChatRequest, messages=checked, **common)


def output_path(template: str, spec: ScheduleSpec, run_id: int, now: float) -> Path:
    """The output file of a run: the template filled in with the run's time (in the schedule's time zone)."""
    tz = zone(spec.timezone)
    moment = datetime.fromtimestamp(now, tz) if tz else datetime.fromtimestamp(now)
    return Path(
        template.format(
            date=moment.strftime("%Y-%m-%d"),
            time=moment.strftime("%H-%M-%S"),
            datetime=moment.strftime("%Y-%m-%dT%H-%M-%S"),
            name=spec.name,
            run=run_id,
        )
    )


def prepare_spec(fields: dict[str, Any], *, base: Path, confined: bool) -> ScheduleSpec:
    """A checked ScheduleSpec with absolute file paths (relative ones are taken from `base`).

    `confined` (the HTTP API): files must be relative paths inside `base`, so no request can make the server
    read or write a file elsewhere; the CLI, run by the machine's user, may name any path."""
    spec = build_spec(**fields)
    paths: dict[str, str] = {}
    for key in ("prompt_file", "messages_file", "output"):
        value = getattr(spec, key)
        if value is None:
            continue
        path = Path(value)
        if confined and (path.is_absolute() or ".." in path.parts or value.startswith("~")):
            raise InvalidRequestError(
                f"{key} must be a relative path inside {base} through the API (the CLI takes any path)"
            )
        path = path.expanduser()
        paths[key] = str(path if path.is_absolute() else base / path)
    spec = spec.model_copy(update=paths)
    validate_files(spec)
    return spec


def validate_files(spec: ScheduleSpec) -> None:
    """Refuse now a schedule whose prompt or messages file cannot be read, or whose output folder cannot be made."""
    request_for(spec)
    if spec.output:
        folder = output_path(spec.output, spec, 0, time.time()).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidRequestError(f"cannot make the output folder {folder}: {error.strerror or error}") from None


def _read(path: str | None, what: str) -> str:
    assert path is not None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidRequestError(f"cannot read the {what} {path}: {reason}") from None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _describe(error: BaseException) -> str:
    if isinstance(error, EmberError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return f"{type(error).__name__}: {error}"


__all__ = [
    "Schedule",
    "Scheduler",
    "output_path",
    "prepare_spec",
    "request_for",
    "scheduled_run_failed",
    "server_scheduler",
    "validate_files",
]
