"""Scheduled jobs with an injected clock: firing on time, coalesced missed runs, failures recorded and reported.

The scheduler is the unit under test here, so the missed-run and interrupted-run tests give it a small fake
answerer; the tests of firing, failing and the API answer through the real model manager and model.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ember.jobs.answering import ManagerAnswerer
from ember.jobs.schedule_store import ScheduleRun, ScheduleSpec, ScheduleStore, build_spec, next_fire_time
from ember.jobs.schedules import Scheduler, prepare_spec
from ember.serve.manager import ModelManager
from ember.types import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse, Message
from tests.jobs.conftest import OPTIONS, Webhook


def _at(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class EchoAnswerer:
    """Answers every request with a fixed text at once (the scheduler's logic is what these tests look at)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def answer(self, request: Any, *, priority: Any) -> AsyncIterator[Any]:
        self.requests.append((request, priority))
        if isinstance(request, ChatRequest):
            yield ChatResponse(model=request.model, message=Message(role="assistant", content="echo"), done=True)
        else:
            yield GenerateResponse(model=request.model, response="echo", done=True)

    async def slots(self, model: str) -> int:
        return 1

    async def close(self) -> None:
        pass


def _spec(tmp_path: Path, **fields: Any) -> ScheduleSpec:
    base = {"name": "daily", "cron": "0 18 * * *", "timezone": "UTC", "model": "smollm2", "prompt": "Say hi."}
    return prepare_spec(base | fields, base=tmp_path, confined=False)


def test_cron_times_time_zones_and_invalid_schedules() -> None:
    assert next_fire_time("0 18 * * *", _at(2026, 3, 1, 17), "UTC") == _at(2026, 3, 1, 18)
    assert next_fire_time("0 18 * * *", _at(2026, 3, 1, 18), "UTC") == _at(2026, 3, 2, 18)  # strictly after
    assert next_fire_time("0 18 * * *", _at(2026, 7, 1, 12), "Europe/Paris") == _at(2026, 7, 1, 16)  # UTC+2
    base = {"name": "n", "model": "m", "prompt": "p"}
    for fields, says in [
        ({"cron": "0 18 * *"}, "five fields"),
        ({"cron": "61 * * * *"}, "not a valid cron"),
        ({"cron": "0 18 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "0 18 * * *", "output": "out/{when}.txt"}, "{date}"),
        ({"cron": "0 18 * * *", "webhook": "ftp://example.invalid/x"}, "http"),
        ({"cron": "0 18 * * *", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"cron": "0 18 * * *", "options": {"temperature": "hot"}}, "temperature"),
        ({"cron": "0 18 * * *", "name": "../up"}, "invalid schedule name"),
    ]:
        with pytest.raises(Exception, match=says):
            build_spec(**(base | fields))


def test_a_job_fires_at_its_time_writes_its_output_and_calls_its_webhook(tmp_path: Path, webhook: Webhook) -> None:
    clock = Clock(_at(2026, 3, 1, 17, 59))
    store = ScheduleStore(tmp_path / "ember.db")
    options = OPTIONS | {"num_predict": 8}
    store.add(_spec(tmp_path, options=options, output="summaries/{date}.txt", webhook=webhook.url), clock())

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        answerer = ManagerAnswerer(ModelManager(default_options={"num_parallel": 1}), owned=True)
        scheduler = Scheduler(store, answerer, clock=clock)
        try:
            early = await scheduler.tick()
            clock.now = _at(2026, 3, 1, 18, 0)
            runs = [await task for task in await scheduler.tick()]
            clock.now += 30
            return early, runs, await scheduler.tick()
        finally:
            await answerer.close()

    early, [run], again = asyncio.run(scenario())
    output = tmp_path / "summaries" / "2026-03-01.txt"
    assert early == [] and again == []  # not before its time, and once at its time
    assert (run.status, run.trigger, run.scheduled_for) == ("succeeded", "cron", _at(2026, 3, 1, 18))
    assert run.response and run.response.strip() and output.read_text() == run.response
    assert run.outputs == [str(output), webhook.url] and run.duration > 0
    [recorded] = store.history("daily")
    assert (recorded.status, recorded.outputs, recorded.response) == ("succeeded", run.outputs, run.response)
    assert store.get("daily").next_run_at == _at(2026, 3, 2, 18)
    [posted] = webhook.bodies
    assert (posted["schedule"], posted["status"], posted["response"]) == ("daily", "succeeded", run.response)
    assert posted["outputs"] == [str(output)] and posted["trigger"] == "cron"


def test_runs_missed_while_no_scheduler_ran_fire_once_at_start(tmp_path: Path) -> None:
    store = ScheduleStore(tmp_path / "ember.db")
    store.add(_spec(tmp_path), _at(2026, 3, 1, 12))  # next: 18:00 on the 1st
    clock = Clock(_at(2026, 3, 4, 9))  # three 18:00s went by with no server running
    answerer = EchoAnswerer()

    async def scenario() -> list[ScheduleRun]:
        scheduler = Scheduler(store, answerer, clock=clock)
        await scheduler.start()
        await scheduler.idle()
        clock.now += 60
        assert await scheduler.tick() == []
        await scheduler.stop()
        return store.history("daily")

    [run] = asyncio.run(scenario())
    assert (run.trigger, run.status, run.scheduled_for) == ("missed", "succeeded", _at(2026, 3, 1, 18))
    assert store.get("daily").next_run_at == _at(2026, 3, 4, 18)
    [(request, priority)] = answerer.requests
    assert isinstance(request, GenerateRequest) and request.prompt == "Say hi." and priority == "low"


def test_a_failing_run_is_recorded_and_reported(tmp_path: Path, webhook: Webhook) -> None:
    clock = Clock(_at(2026, 3, 1, 18))
    store = ScheduleStore(tmp_path / "ember.db")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Summarise the day.")
    store.add(_spec(tmp_path, name="gone", model="no-such-model", webhook=webhook.url), clock() - 60)
    store.add(_spec(tmp_path, name="moved", prompt=None, prompt_file=str(prompt)), clock() - 60)
    prompt.unlink()  # after the schedule was added: the run finds it gone
    reported: list[tuple[str, ScheduleRun]] = []

    async def scenario() -> list[ScheduleRun]:
        answerer = ManagerAnswerer(ModelManager(), owned=True)
        scheduler = Scheduler(store, answerer, clock=clock, on_failure=lambda s, r: reported.append((s.name, r)))
        try:
            return [await task for task in await scheduler.tick()]
        finally:
            await answerer.close()

    runs = {run.schedule: run for run in asyncio.run(scenario())}
    assert runs["gone"].status == "failed" and "no-such-model" in runs["gone"].error
    assert runs["moved"].status == "failed" and "cannot read the prompt file" in runs["moved"].error
    assert sorted(name for name, _ in reported) == ["gone", "moved"]
    assert [run.status for run in store.history("gone")] == ["failed"]
    [posted] = webhook.bodies
    assert posted["status"] == "failed" and "no-such-model" in posted["error"]


def test_a_run_cut_short_by_a_stopped_process_is_recorded_as_interrupted(tmp_path: Path) -> None:
    store = ScheduleStore(tmp_path / "ember.db")
    store.add(_spec(tmp_path), _at(2026, 3, 1, 12))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with store.tables.connect() as db:  # a run that a process, now gone, left running
        db.execute(
            "INSERT INTO schedule_runs (schedule, trigger, started_at, status, pid) VALUES ('daily', 'cron', 1, "
            "'running', ?)",
            (int(finished.stdout),),
        )
    reported: list[ScheduleRun] = []

    async def scenario() -> None:
        clock = Clock(_at(2026, 3, 1, 13))
        scheduler = Scheduler(store, EchoAnswerer(), clock=clock, on_failure=lambda s, r: reported.append(r))
        await scheduler.start()
        await scheduler.stop()

    asyncio.run(scenario())
    [run] = store.history("daily")
    assert run.status == "interrupted" and "stopped before it finished" in run.error
    assert [r.id for r in reported] == [run.id]
