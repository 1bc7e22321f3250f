"""The jobs tables in EMBER_HOME/ember.db (SQLite, WAL): OpenAI files, batches, and each batch line's result.

The database file is shared with other parts of ember (saved sessions, conversations), so these tables carry
their own names and their own schema version (`jobs_schema_version`), migrated forward on first use in one
transaction. Connections are opened per operation, as `ember.sessions` does, so several processes and threads
may use the file at once (SQLite's locking, a busy timeout).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.errors import EmberError

_BUSY_TIMEOUT_S = 10.0

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


class JobsDatabaseError(EmberError):
    """The jobs tables cannot be used (a damaged database, a newer schema, an unwritable folder)."""


def default_path() -> Path:
    from ember.config import Settings

    return Settings().home / "ember.db"


class JobsDatabase:
    """Opens connections to the database file, making or migrating the jobs tables the first time."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._ready = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode: callers open their own transactions (BEGIN IMMEDIATE to write)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise JobsDatabaseError(f"cannot open the database {self.path}: {error}") from None
        try:
            try:
                if not self._ready:
                    connection.execute("PRAGMA journal_mode = WAL")
                    self._migrate(connection)
                    self._ready = True
            except sqlite3.DatabaseError as error:
                raise JobsDatabaseError(
                    f"the database {self.path} is damaged or not a database ({error}); move it away to start afresh"
                ) from None
            yield connection
        except sqlite3.DatabaseError as error:
            raise JobsDatabaseError(f"the database {self.path} failed: {error}") from None
        finally:
            connection.close()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS jobs_schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM jobs_schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise JobsDatabaseError(
                    f"the jobs tables have schema version {version}, newer than this ember knows "
                    f"({len(MIGRATIONS)}); upgrade ember"
                )
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            if row is None:
                db.execute("INSERT INTO jobs_schema_version (version) VALUES (?)", (len(MIGRATIONS),))
            else:
                db.execute("UPDATE jobs_schema_version SET version = ?", (len(MIGRATIONS),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
