"""EMBER_HOME/ember.db: the one SQLite file (WAL) where ember keeps its state, shared by its owners.

Each owner of tables (conversations, batch files and batches, the worker's request ledger, schedules) opens
the file through a `SharedDatabase` of its own: one connection per operation, so threads and processes may
use the file at once (SQLite's locking, a busy timeout order the writers); foreign keys on; the owner's schema
made or migrated forward on first use, in one transaction, its version kept per owner in `schema_versions`.
Each owner keeps to its own tables and its own list of migrations. Errors say what to do: a damaged file, a
schema newer than this ember, a full disk (DiskFullError: nothing of the operation was stored).
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ember.errors import DiskFullError, EmberError

BUSY_TIMEOUT_S = 10.0
_LOW_SPACE = 1024 * 1024  # bytes free under which a failed write is put down to a full disk

# A migration moves an owner's schema one version up: SQL statements (triggers included), or a function for
# what SQL alone cannot say. Never edit one that shipped; append another.
Migration = str | Callable[[sqlite3.Connection], None]


class DatabaseError(EmberError):
    """The database cannot be used (damaged, not a database, a newer schema, an unwritable folder)."""


def default_path() -> Path:
    """EMBER_HOME/ember.db."""
    from ember.config import Settings

    return Settings().home / "ember.db"


def statements(script: str) -> Iterator[str]:
    """The complete SQL statements of `script`, one by one (executescript() would commit the transaction); a
    `;` inside a statement (a trigger's body, a string) does not end it."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                yield buffer.strip()
            buffer = ""
    if buffer.strip(" \n\t;"):
        yield buffer.strip().removesuffix(";")


class SharedDatabase:
    """One owner's tables in a SQLite file. `connect()` opens a connection with the pragmas set and the
    owner's schema ready; `description` names the file in errors, `error` is the class they are raised as."""

    def __init__(
        self,
        path: str | Path | None,
        owner: str,
        migrations: Sequence[Migration],
        *,
        description: str = "the database",
        error: type[DatabaseError] = DatabaseError,
        rows_by_name: bool = True,
    ) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.owner = owner
        self.migrations = tuple(migrations)
        self.description = description
        self.error = error
        self.rows_by_name = rows_by_name  # rows as sqlite3.Row, else plain tuples
        self._ready = False
        self._ready_lock = threading.Lock()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode; to write, use `transaction()`."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise self.error(f"cannot open {self.description} {self.path}: {error}") from None
        if self.rows_by_name:
            connection.row_factory = sqlite3.Row
        try:
            try:
                connection.execute("PRAGMA foreign_keys = ON")
                if not self._ready:
                    with self._ready_lock:
                        if not self._ready:
                            self._migrate(connection)
                            self._ready = True
            except sqlite3.DatabaseError as error:
                if _disk_full(error, self.path.parent):
                    raise self._disk_full(error) from None
                raise self.error(
                    f"{self.description} {self.path} is damaged or not a database ({error}); "
                    "move it away to start afresh"
                ) from None
            yield connection
        except sqlite3.DatabaseError as error:
            if _disk_full(error, self.path.parent):
                raise self._disk_full(error) from None
            raise self.error(f"{self.description} {self.path} failed: {error}") from None
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): one write, all or nothing,
        and a read-then-write inside it is atomic (the write lock is taken at once)."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a read transaction: several SELECTs see one consistent state."""
        with self.connect() as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def _disk_full(self, error: sqlite3.Error) -> DiskFullError:
        return DiskFullError(
            f"the disk holding {self.description} {self.path} is full ({error}); free some space and try again: "
            "nothing of this request was stored"
        )

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            _fold_jobs_versions(db)
            row = db.execute("SELECT version FROM schema_versions WHERE component = ?", (self.owner,)).fetchone()
            version = row[0] if row else 0
            if version > len(self.migrations):
                raise self.error(
                    f"the {self.owner} tables in {self.path} have schema version {version}, newer than this ember "
                    f"knows ({len(self.migrations)}); upgrade ember"
                )
            for migration in self.migrations[version:]:
                if isinstance(migration, str):
                    for statement in statements(migration):
                        db.execute(statement)
                else:
                    migration(db)
            db.execute(
                "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (self.owner, len(self.migrations)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _fold_jobs_versions(db: sqlite3.Connection) -> None:
    """Files written before one version table kept the jobs' versions in `jobs_schema_versions`: move them."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs_schema_versions'").fetchone():
        db.execute(
            "INSERT OR IGNORE INTO schema_versions (component, version) SELECT owner, version FROM jobs_schema_versions"
        )
        db.execute("DROP TABLE jobs_schema_versions")


def _disk_full(error: sqlite3.Error, folder: Path) -> bool:
    """SQLITE_FULL, or an I/O error on a disk with no room left (what SQLite reports when a WAL write fails)."""
    if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE
    except OSError:
        return False
