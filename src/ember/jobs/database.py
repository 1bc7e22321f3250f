"""The jobs' tables in EMBER_HOME/ember.db (SQLite, WAL), the file that saved sessions share.

Every owner of tables here (the batch files and batches, the worker's request ledger, the schedules) opens
them through a `JobsDatabase`: one connection per operation, as `ember.sessions` opens its own, so several
processes and threads may use the file at once (SQLite's locking, a busy timeout); WAL mode; and the owner's
schema made or migrated forward on first use, in one transaction, its version kept per owner in
`jobs_schema_versions`. Each owner keeps to its own tables and its own list of migrations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ember.errors import EmberError

BUSY_TIMEOUT_S = 10.0


class JobsDatabaseError(EmberError):
    """The jobs' tables cannot be used (a damaged database, a newer schema, an unwritable folder)."""


def default_path() -> Path:
    from ember.config import Settings

    return Settings().home / "ember.db"


class JobsDatabase:
    """One owner's tables in a SQLite file.

    `migrations[i]` moves the owner's schema from version i to i + 1: SQL statements separated by `;` (none
    inside a statement). Never edit one that shipped; append another.
    """

    def __init__(self, path: str | Path | None, owner: str, migrations: Sequence[str]) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.owner = owner
        self.migrations = tuple(migrations)
        self._ready = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode (rows as sqlite3.Row); to write, use `transaction()` or BEGIN
        IMMEDIATE."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise JobsDatabaseError(f"cannot open the database {self.path}: {error}") from None
        connection.row_factory = sqlite3.Row
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

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs_schema_versions (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = db.execute("SELECT version FROM jobs_schema_versions WHERE owner = ?", (self.owner,)).fetchone()
            version = row[0] if row else 0
            if version > len(self.migrations):
                raise JobsDatabaseError(
                    f"the {self.owner} tables in {self.path} have schema version {version}, newer than this ember "
                    f"knows ({len(self.migrations)}); upgrade ember"
                )
            for script in self.migrations[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(
                "INSERT INTO jobs_schema_versions (owner, version) VALUES (?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET version = excluded.version",
                (self.owner, len(self.migrations)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
