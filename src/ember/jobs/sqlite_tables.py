"""The jobs' tables in EMBER_HOME/ember.db, the SQLite file that sessions and others share.

Connections are opened the way `ember.sessions` opens them: one per call (safe across processes and threads),
WAL mode, a busy timeout, and the schema created on first use. Each owner keeps to its own tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.errors import EmberError

BUSY_TIMEOUT_S = 10.0


class JobDatabaseError(EmberError):
    """The jobs' database cannot be used (damaged, not a database, unwritable)."""


def default_database_path() -> Path:
    from ember.config import Settings

    return Settings().home / "ember.db"


class Tables:
    """A SQLite file and the schema of some tables in it; `connect()` yields a connection in autocommit mode."""

    def __init__(self, path: str | Path | None, schema: str) -> None:
        self.path = Path(path) if path is not None else default_database_path()
        self._schema = schema
        self._ready = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise JobDatabaseError(f"cannot open the database {self.path}: {error}") from None
        connection.row_factory = sqlite3.Row
        try:
            try:
                if not self._ready:
                    connection.execute("PRAGMA journal_mode = WAL")
                    connection.executescript(self._schema)
                    self._ready = True
            except sqlite3.DatabaseError as error:
                raise JobDatabaseError(
                    f"the database {self.path} is damaged or not a database ({error}); move it away to start afresh"
                ) from None
            yield connection
        except sqlite3.DatabaseError as error:
            raise JobDatabaseError(f"the database {self.path} failed: {error}") from None
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock at once (BEGIN IMMEDIATE), so read-then-write is atomic."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
