"""Batches and their line results in SQLite: the durable state that lets a restarted server resume a batch.

A batch is a row holding OpenAI's Batch object (as JSON) and its status. Each finished line is one row of
`batch_results` keyed by (batch, line): it is written once, in its own transaction, with INSERT OR IGNORE, so a
line whose result is stored is never run or counted again, whatever happens to the server afterwards. The
request counts and usage of a batch are read from those rows, so they can never drift from the results.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from ember.errors import EmberError, InvalidRequestError
from ember.jobs.batch_lines import LineResult, usage_of
from ember.jobs.database import JobsDatabase

BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class NoSuchBatchError(EmberError):
    http_status = 404


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class BatchStore:
    """Batch objects and line results."""

    def __init__(self, database: JobsDatabase) -> None:
        self.database = database

    def create(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        window_seconds: float,
        metadata: dict[str, str] | None,
        total: int,
        model: str | None,
    ) -> dict[str, Any]:
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": new_batch_id(),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "expires_at": int(now + window_seconds),
            **dict.fromkeys(TIMESTAMPS),
            "request_counts": {"total": total, "completed": 0, "failed": 0},
            "metadata": metadata,
            "model": model,
        }
        with self.database.connect() as db:
            db.execute(
                "INSERT INTO batches (id, status, data) VALUES (?, ?, ?)",
                (batch["id"], batch["status"], json.dumps(batch)),
            )
        return self._with_counts(batch)

    def _load(self, db: Any, batch_id: str) -> dict[str, Any]:
        if not BATCH_ID.fullmatch(batch_id):
            raise NoSuchBatchError(f"No such Batch object: {batch_id}")
        row = db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NoSuchBatchError(f"No such Batch object: {batch_id}")
        return json.loads(row[0])

    def get(self, batch_id: str) -> dict[str, Any]:
        with self.database.connect() as db:
            batch = self._load(db, batch_id)
        return self._with_counts(batch)

    def update(self, batch_id: str, *, only_from: tuple[str, ...] | None = None, **fields: Any) -> dict[str, Any]:
        """Change fields of a batch in one transaction; with `only_from`, only if its status is one of those
        (else the batch is returned unchanged), so a cancel and a completion racing each other cannot both win."""
        with self.database.transaction() as db:
            batch = self._load(db, batch_id)
            if only_from is None or batch["status"] in only_from:
                batch.update(fields)
                db.execute(
                    "UPDATE batches SET status = ?, data = ? WHERE id = ?",
                    (batch["status"], json.dumps(batch), batch_id),
                )
        return self._with_counts(batch)

    def list(self, *, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Batches newest first, after the batch `after`; (batches, has_more)."""
        if not 1 <= limit <= 100:
            raise InvalidRequestError("limit must be from 1 to 100")
        with self.database.connect() as db:
            if after is not None:
                row = db.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise NoSuchBatchError(f"No such Batch object: {after}")
                rows = db.execute(
                    "SELECT data FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?", (row[0], limit + 1)
                ).fetchall()
            else:
                rows = db.execute("SELECT data FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,)).fetchall()
        return [self._with_counts(json.loads(row[0])) for row in rows[:limit]], len(rows) > limit

    def active(self) -> list[str]:
        """Ids of the batches not finished yet, oldest first (to resume them at start)."""
        marks = ", ".join("?" * len(ACTIVE))
        with self.database.connect() as db:
            rows = db.execute(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE).fetchall()
        return [row[0] for row in rows]

    # --- line results ----------------------------------------------------------------------------------

    def record(self, batch_id: str, result: LineResult) -> bool:
        """Store a line's result unless it has one; True if this call stored it."""
        usage = usage_of(result.output)
        with self.database.connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO batch_results "
                "(batch_id, line, ok, output, input_tokens, cached_tokens, output_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    result.index,
                    int(result.ok),
                    json.dumps(result.output),
                    usage["input"],
                    usage["cached"],
                    usage["output"],
                ),
            )
        return cursor.rowcount == 1

    def results(self, batch_id: str) -> dict[int, tuple[bool, dict[str, Any]]]:
        """Each finished line's (succeeded, output line), by line index."""
        with self.database.connect() as db:
            rows = db.execute("SELECT line, ok, output FROM batch_results WHERE batch_id = ?", (batch_id,)).fetchall()
        return {line: (bool(ok), json.loads(output)) for line, ok, output in rows}

    def _with_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        with self.database.connect() as db:
            row = db.execute(
                "SELECT COALESCE(SUM(ok), 0), COUNT(*), COALESCE(SUM(input_tokens), 0), "
                "COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(output_tokens), 0) "
                "FROM batch_results WHERE batch_id = ?",
                (batch["id"],),
            ).fetchone()
        completed, finished, input_tokens, cached, output_tokens = row
        counts = {"total": batch["request_counts"]["total"], "completed": completed, "failed": finished - completed}
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        return {**batch, "request_counts": counts, "usage": usage}
