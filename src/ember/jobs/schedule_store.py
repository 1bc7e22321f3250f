"""Schedules and their runs, stored in SQLite (EMBER_HOME/ember.db, tables `schedules` and `schedule_runs`).

A schedule is a cron expression and a request: a model and a prompt (text, a file read at each run, or
messages), options, and where the answer goes (a file path template, a webhook). `next_run_at` is stored, so a
run that falls while no server is running is still due when one starts: it fires once then (coalesced), and
the next time is counted from that moment. Every run is recorded: when, why (cron, missed, manual), status,
duration, the answer, where it went, and the error of a failed one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ember.errors import EmberError, InvalidRequestError
from ember.jobs.database import JobsDatabase
from ember.options import resolve_options

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
OUTPUT_FIELDS = ("date", "time", "datetime", "name", "run")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,           -- the ScheduleSpec as JSON
    next_run_at REAL NOT NULL,    -- epoch seconds
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_runs (
    id INTEGER PRIMARY KEY,
    schedule TEXT NOT NULL,
    trigger TEXT NOT NULL,        -- cron, missed, manual
    scheduled_for REAL,           -- the cron time it stands for (cron, missed)
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,         -- running, succeeded, failed, interrupted
    pid INTEGER,                  -- the process running it, to find runs whose process died
    duration REAL,
    response TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',  -- JSON list: where the answer went
    error TEXT
);
CREATE INDEX IF NOT EXISTS schedule_runs_by_schedule ON schedule_runs (schedule, id);
"""

Trigger = Literal["cron", "missed", "manual"]
RunStatus = Literal["running", "succeeded", "failed", "interrupted"]


class ScheduleNotFoundError(EmberError):
    http_status = 404


class ScheduleExistsError(EmberError):
    http_status = 409


def check_schedule_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"invalid schedule name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter "
            "or digit"
        )
    return name


def zone(name: str | None) -> ZoneInfo | None:
    """The time zone a schedule's cron is read in; None is this machine's local time."""
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequestError(f"unknown time zone {name!r}: use an IANA name such as Europe/Paris or UTC") from None


def next_fire_time(cron: str, after: float, timezone: str | None = None) -> float:
    """The first time strictly after `after` (epoch seconds) that the cron expression names."""
    from datetime import datetime

    tz = zone(timezone)
    start = datetime.fromtimestamp(after, tz) if tz else datetime.fromtimestamp(after)
    # A naive start is local wall-clock time: croniter walks it, .timestamp() maps it back through local rules.
    return croniter(cron, start).get_next(datetime).timestamp()


class ScheduleSpec(BaseModel):
    """What `ember schedule add` and POST /api/schedules take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    cron: str = Field(description='Five-field cron expression, such as "0 18 * * *" (every day at 18:00).')
    timezone: str | None = Field(None, description="IANA time zone of the cron expression; default: local time.")
    model: str = Field(description="The model to ask.")
    prompt: str | None = Field(None, description="The prompt.")
    prompt_file: str | None = Field(None, description="A file whose text is the prompt, read at each run.")
    messages: list[dict[str, Any]] | None = Field(None, description="Chat messages to send.")
    messages_file: str | None = Field(None, description="A JSON file of chat messages, read at each run.")
    system: str | None = Field(None, description="System prompt.")
    options: dict[str, Any] = Field(default_factory=dict, description="Load and sampling options (Ollama's).")
    format: str | dict[str, Any] | None = Field(None, description='"json", or a JSON schema for the answer.')
    output: str | None = Field(
        None, description="File the answer is written to; may use {date}, {time}, {datetime}, {name}, {run}."
    )
    webhook: str | None = Field(None, description="URL that gets each run's result as a JSON POST.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_schedule_name(value)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value.startswith("@") and len(value.split()) != 5:
            raise ValueError('use five fields: minute hour day-of-month month day-of-week, such as "0 18 * * *"')
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        zone(value)
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        resolve_options(value)  # unknown names and bad values are refused now, not at 18:00
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("", "json"):
            raise ValueError(f'format must be "json" or a JSON schema object, not {value!r}')
        return value or None

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            value.format(**dict.fromkeys(OUTPUT_FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"the output template may use {{{'}, {'.join(OUTPUT_FIELDS)}}} only ({error})") from None
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value is not None and (urlparse(value).scheme not in ("http", "https") or not urlparse(value).netloc):
            raise ValueError("the webhook must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> ScheduleSpec:
        given = [k for k in ("prompt", "prompt_file", "messages", "messages_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_file, messages or messages_file")
        return self


def build_spec(**fields: Any) -> ScheduleSpec:
    """A ScheduleSpec, or InvalidRequestError naming each problem."""
    try:
        return ScheduleSpec(**fields)
    except ValidationError as error:
        problems = []
        for detail in error.errors():
            where = ".".join(str(part) for part in detail["loc"])
            message = str(detail["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise InvalidRequestError("invalid schedule: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class Schedule:
    spec: ScheduleSpec
    next_run_at: float
    created_at: float

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class ScheduleRun:
    id: int
    schedule: str
    trigger: Trigger
    scheduled_for: float | None
    started_at: float
    status: RunStatus = "running"
    finished_at: float | None = None
    duration: float | None = None
    response: str | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "schedule": self.schedule,
            "trigger": self.trigger,
            "scheduled_for": self.scheduled_for,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "duration": self.duration,
            "response": self.response,
            "outputs": self.outputs,
            "error": self.error,
        }


class ScheduleStore:
    """Schedules and runs in one SQLite file; every call opens its own connection (safe across processes)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.tables = JobsDatabase(path, "schedules", (_SCHEMA,))

    # --- schedules -----------------------------------------------------------------------------------

    def add(self, spec: ScheduleSpec, now: float, *, replace: bool = False) -> Schedule:
        next_run_at = next_fire_time(spec.cron, now, spec.timezone)
        with self.tables.transaction() as db:
            exists = db.execute("SELECT 1 FROM schedules WHERE name = ?", (spec.name,)).fetchone()
            if exists and not replace:
                raise ScheduleExistsError(
                    f"a schedule named {spec.name!r} exists already; remove it first (`ember schedule rm "
                    f"{spec.name}`) or pick another name"
                )
            db.execute(
                "INSERT OR REPLACE INTO schedules (name, spec, next_run_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (spec.name, spec.model_dump_json(), next_run_at, now, now),
            )
        return Schedule(spec, next_run_at, now)

    def get(self, name: str) -> Schedule:
        check_schedule_name(name)
        with self.tables.connect() as db:
            row = db.execute("SELECT spec, next_run_at, created_at FROM schedules WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ScheduleNotFoundError(f"no schedule named {name!r}; see `ember schedule list`")
        return _schedule(row)

    def list(self) -> list[Schedule]:
        with self.tables.connect() as db:
            rows = db.execute("SELECT spec, next_run_at, created_at FROM schedules ORDER BY name").fetchall()
        return [_schedule(row) for row in rows]

    def remove(self, name: str) -> None:
        check_schedule_name(name)
        with self.tables.connect() as db:
            if db.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 0:
                raise ScheduleNotFoundError(f"no schedule named {name!r}; see `ember schedule list`")

    def claim_due(self, name: str, due_at: float, next_run_at: float) -> bool:
        """Move a due schedule on to its next time; False if another scheduler did it first."""
        with self.tables.connect() as db:
            cursor = db.execute(
                "UPDATE schedules SET next_run_at = ? WHERE name = ? AND next_run_at = ?",
                (next_run_at, name, due_at),
            )
            return cursor.rowcount == 1

    # --- runs ----------------------------------------------------------------------------------------

    def start_run(self, name: str, trigger: Trigger, scheduled_for: float | None, now: float) -> ScheduleRun:
        with self.tables.connect() as db:
            cursor = db.execute(
                "INSERT INTO schedule_runs (schedule, trigger, scheduled_for, started_at, status, pid) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                (name, trigger, scheduled_for, now, os.getpid()),
            )
        return ScheduleRun(int(cursor.lastrowid or 0), name, trigger, scheduled_for, now)

    def finish_run(self, run: ScheduleRun) -> None:
        with self.tables.connect() as db:
            db.execute(
                "UPDATE schedule_runs SET status = ?, finished_at = ?, duration = ?, response = ?, outputs = ?, "
                "error = ? WHERE id = ?",
                (
                    run.status,
                    run.finished_at,
                    run.duration,
                    run.response,
                    json.dumps(run.outputs),
                    run.error,
                    run.id,
                ),
            )

    def history(self, name: str, limit: int = 20) -> list[ScheduleRun]:
        """The schedule's latest runs, newest first."""
        check_schedule_name(name)
        with self.tables.connect() as db:
            rows = db.execute(
                "SELECT * FROM schedule_runs WHERE schedule = ? ORDER BY id DESC LIMIT ?", (name, limit)
            ).fetchall()
        return [_run(row) for row in rows]

    def mark_interrupted(self, now: float) -> list[ScheduleRun]:
        """Runs left `running` by a process that is gone (a server stopped mid-run): recorded as interrupted."""
        error = "the process running it stopped before it finished"
        with self.tables.transaction() as db:
            rows = db.execute("SELECT * FROM schedule_runs WHERE status = 'running'").fetchall()
            runs = [_run(row) for row in rows if not _alive(row["pid"])]
            for run in runs:
                run.status, run.finished_at, run.error = "interrupted", now, error
                db.execute(
                    "UPDATE schedule_runs SET status = 'interrupted', finished_at = ?, error = ? WHERE id = ?",
                    (now, error, run.id),
                )
        return runs


def _alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False  # this process has just started: a run recorded under its pid is an older one's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _schedule(row: Any) -> Schedule:
    return Schedule(ScheduleSpec.model_validate_json(row["spec"]), row["next_run_at"], row["created_at"])


def _run(row: Any) -> ScheduleRun:
    return ScheduleRun(
        id=row["id"],
        schedule=row["schedule"],
        trigger=row["trigger"],
        scheduled_for=row["scheduled_for"],
        started_at=row["started_at"],
        status=row["status"],
        finished_at=row["finished_at"],
        duration=row["duration"],
        response=row["response"],
        outputs=json.loads(row["outputs"] or "[]"),
        error=row["error"],
    )
