"""The worker's memory of requests, by request_id, in SQLite: so a redelivered message is not answered twice.

RabbitMQ delivers a message again when the worker holding it goes away before acknowledging it. The worker
acknowledges only after its answer was published and confirmed, so a redelivery means either "not answered
yet" (answer it) or "answered, but the ack was lost" (acknowledge it without answering). This table tells the
two apart, and counts deliveries so that a message that kills or fails every worker that takes it is
dead-lettered after `max_attempts` instead of going round forever.

The answer is recorded after the broker confirmed it and before the ack, so the only window for a second
answer is a crash between those two steps (microseconds); answers carry the request_id so a consumer can
drop such a duplicate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ember.jobs.database import JobsDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS worker_requests (
    queue TEXT NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,             -- working, answered, dead
    deliveries INTEGER NOT NULL,
    last_error TEXT,
    answered_to TEXT,                 -- the queue the answer (or the dead letter) went to
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (queue, request_id)
);
CREATE INDEX IF NOT EXISTS worker_requests_updated ON worker_requests (updated_at);
"""
KEEP_SECONDS = 7 * 24 * 3600.0  # a redelivery older than a week is answered again

Status = Literal["working", "answered", "dead"]


@dataclass(frozen=True)
class RequestState:
    status: Status
    deliveries: int  # this delivery included
    last_error: str | None


class RequestLedger:
    """Per-queue request states; safe for several worker processes sharing one database file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.tables = JobsDatabase(path, "request_ledger", (_SCHEMA,))

    def begin(self, queue: str, request_id: str) -> RequestState:
        """Count a delivery of a request; an answered or dead one stays so (its delivery count unchanged)."""
        now = time.time()
        with self.tables.transaction() as db:
            row = db.execute(
                "SELECT status, deliveries, last_error FROM worker_requests WHERE queue = ? AND request_id = ?",
                (queue, request_id),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO worker_requests (queue, request_id, status, deliveries, first_seen, updated_at) "
                    "VALUES (?, ?, 'working', 1, ?, ?)",
                    (queue, request_id, now, now),
                )
                return RequestState("working", 1, None)
            if row["status"] != "working":
                return RequestState(row["status"], row["deliveries"], row["last_error"])
            db.execute(
                "UPDATE worker_requests SET deliveries = deliveries + 1, updated_at = ? "
                "WHERE queue = ? AND request_id = ?",
                (now, queue, request_id),
            )
            return RequestState("working", row["deliveries"] + 1, row["last_error"])

    def release(self, queue: str, request_id: str) -> None:
        """Take back a delivery that ended through no fault of the message (the broker went away, a drain)."""
        with self.tables.connect() as db:
            db.execute(
                "UPDATE worker_requests SET deliveries = MAX(deliveries - 1, 0), updated_at = ? "
                "WHERE queue = ? AND request_id = ? AND status = 'working'",
                (time.time(), queue, request_id),
            )

    def failed(self, queue: str, request_id: str, error: str) -> None:
        self._set(queue, request_id, "working", error=error)

    def answered(self, queue: str, request_id: str, answered_to: str) -> None:
        self._set(queue, request_id, "answered", answered_to=answered_to)

    def dead(self, queue: str, request_id: str, error: str, dead_letter_queue: str) -> None:
        self._set(queue, request_id, "dead", error=error, answered_to=dead_letter_queue)

    def state(self, queue: str, request_id: str) -> RequestState | None:
        with self.tables.connect() as db:
            row = db.execute(
                "SELECT status, deliveries, last_error FROM worker_requests WHERE queue = ? AND request_id = ?",
                (queue, request_id),
            ).fetchone()
        return None if row is None else RequestState(row["status"], row["deliveries"], row["last_error"])

    def prune(self, older_than: float = KEEP_SECONDS) -> int:
        """Forget requests not seen for `older_than` seconds; returns how many."""
        with self.tables.connect() as db:
            return db.execute("DELETE FROM worker_requests WHERE updated_at < ?", (time.time() - older_than,)).rowcount

    def _set(
        self, queue: str, request_id: str, status: Status, *, error: str | None = None, answered_to: str | None = None
    ) -> None:
        now = time.time()
        with self.tables.connect() as db:
            db.execute(
                "INSERT INTO worker_requests (queue, request_id, status, deliveries, last_error, answered_to, "
                "first_seen, updated_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?) "
                "ON CONFLICT (queue, request_id) DO UPDATE SET status = excluded.status, "
                "last_error = COALESCE(excluded.last_error, last_error), "
                "answered_to = COALESCE(excluded.answered_to, answered_to), updated_at = excluded.updated_at",
                (queue, request_id, status, error, answered_to, now, now),
            )
