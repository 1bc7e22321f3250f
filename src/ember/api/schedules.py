"""/api/schedules: the scheduled jobs `ember serve` runs (see ember.jobs.schedules).

    GET    /api/schedules                    the schedules, each with its next time and last run
    POST   /api/schedules                    add one: {name, cron, model, prompt | prompt_file | messages | ...}
    GET    /api/schedules/{name}             one schedule
    DELETE /api/schedules/{name}             remove it (its history stays)
    POST   /api/schedules/{name}/run         run it now; answers with the finished run
    GET    /api/schedules/{name}/history     its latest runs (?limit=N, newest first)

Files named through this API (output, prompt_file, messages_file) are relative paths inside EMBER_HOME/schedules,
so no request can make the server read or write elsewhere; the CLI, run by the machine's user, takes any path.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from ember.api import schemas
from ember.api.bodies import read_json
from ember.api.ollama import manager_of
from ember.errors import InvalidRequestError
from ember.jobs.schedule_store import Schedule, ScheduleRun, ScheduleSpec, ScheduleStore
from ember.jobs.schedules import Scheduler, prepare_spec

router = APIRouter()
_MAX_HISTORY = 1000


def scheduler_of(request: Request) -> Scheduler:
    return request.app.state.scheduler


def _time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def run_json(run: ScheduleRun) -> dict[str, Any]:
    return run.as_json() | {
        "scheduled_for": _time(run.scheduled_for),
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
    }


def schedule_json(schedule: Schedule, last: ScheduleRun | None) -> dict[str, Any]:
    return {
        **schedule.spec.model_dump(exclude_none=True),
        "next_run_at": _time(schedule.next_run_at),
        "created_at": _time(schedule.created_at),
        "last_run": run_json(last) if last is not None else None,
    }


def _with_last_run(store: ScheduleStore, schedule: Schedule) -> dict[str, Any]:
    runs = store.history(schedule.name, limit=1)
    return schedule_json(schedule, runs[0] if runs else None)


@router.get("/api/schedules")
async def list_schedules(request: Request) -> dict[str, Any]:
    store = scheduler_of(request).store

    def listing() -> list[dict[str, Any]]:
        return [_with_last_run(store, schedule) for schedule in store.list()]

    return {"schedules": await asyncio.to_thread(listing)}


@router.post("/api/schedules", openapi_extra=schemas.model_body(ScheduleSpec))
async def add_schedule(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    options = body.get("options")
    # The server's caps (serve's own check) hold for what the schedule will ask: refused now, not at each run.
    manager_of(request).limits.check_options(options if isinstance(options, dict) else None)
    scheduler = scheduler_of(request)
    base = request.app.state.settings.home / "schedules"
    spec = await asyncio.to_thread(prepare_spec, body, base=base, confined=True)
    schedule = await asyncio.to_thread(scheduler.store.add, spec, scheduler.clock())
    scheduler.wake()
    return schedule_json(schedule, None)


@router.get("/api/schedules/{name}")
async def get_schedule(request: Request, name: str) -> dict[str, Any]:
    store = scheduler_of(request).store
    return await asyncio.to_thread(lambda: _with_last_run(store, store.get(name)))


@router.delete("/api/schedules/{name}")
async def remove_schedule(request: Request, name: str) -> dict[str, Any]:
    scheduler = scheduler_of(request)
    await asyncio.to_thread(scheduler.store.remove, name)
    scheduler.wake()
    return {"status": "removed", "name": name}


@router.post("/api/schedules/{name}/run")
async def run_schedule(request: Request, name: str) -> dict[str, Any]:
    """Run now and answer with the finished run (its status says whether it succeeded)."""
    return run_json(await scheduler_of(request).run_now(name))


@router.get("/api/schedules/{name}/history")
async def schedule_history(request: Request, name: str, limit: int = 20) -> dict[str, Any]:
    if not 1 <= limit <= _MAX_HISTORY:
        raise InvalidRequestError(f"limit must be from 1 to {_MAX_HISTORY}")
    store = scheduler_of(request).store
    runs = await asyncio.to_thread(store.history, name, limit)
    if not runs:
        await asyncio.to_thread(store.get, name)  # a 404 for an unknown schedule, [] for one not run yet
    return {"name": name, "runs": [run_json(run) for run in runs]}
