"""The batch tables in EMBER_HOME/ember.db: OpenAI files, batches, and each batch line's result.

They are opened like the other jobs' tables (see ember.jobs.database), under the owner name "batches".
"""

from __future__ import annotations

from pathlib import Path

from ember.jobs.database import JobsDatabase

# Each entry moves the schema from version i to i + 1. Never edit one that shipped; append another.
MIGRATIONS = (
    """
    CREATE TABLE openai_files (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER
    );
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX batches_by_status ON batches (status);
    CREATE TABLE batch_results (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        output TEXT NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, line)
    );
    """,
)


def batch_database(path: str | Path | None = None) -> JobsDatabase:
    """The batch tables in the database file at `path` (default: EMBER_HOME/ember.db)."""
    return JobsDatabase(path, "batches", MIGRATIONS)
