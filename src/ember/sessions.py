"""Saved chat sessions, stored durably in SQLite (WAL mode) at EMBER_HOME/ember.db.

`ember run`'s `/save NAME` and `/load NAME` use this store; the server's sessions will share it.

    store = SessionStore(path)
    store.save(Session(name="demo", model="smollm2", messages=[{"role": "user", "content": "Hi"}]))
    store.load("demo").messages

A save replaces any session of the same name in one transaction, so a reader sees the old or the new
conversation, never a mix. Several processes may use the file at once (SQLite's locking, a busy timeout).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError, InvalidRequestError

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    system TEXT,
    options TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (session_id, position)
);
"""


class SessionError(EmberError):
    """The session database cannot be used (damaged, not a database, unwritable)."""


class SessionNotFoundError(EmberError):
    """No session has that name."""


@dataclass
class Session:
    """A conversation: its model, system prompt, options, and messages ({'role', 'content'} dicts)."""

    name: str
    model: str
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    updated_at: float = 0.0


@dataclass(frozen=True)
class SessionSummary:
    name: str
    model: str
    message_count: int
    updated_at: float


def check_session_name(name: str) -> str:
    """A valid session name, or InvalidRequestError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(f"invalid session name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.'")
    return name


def default_path() -> Path:
    from ember.config import Settings

    return Settings().home / "ember.db"


class SessionStore:
    """Sessions in one SQLite file; each call opens its own connection, so it is safe across processes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise SessionError(f"cannot open the session database {self.path}: {error}") from None
        try:
            try:
                connection.execute("PRAGMA foreign_keys = ON")
                if not self._ready:
                    connection.execute("PRAGMA journal_mode = WAL")
                    connection.executescript(_SCHEMA)
                    self._ready = True
            except sqlite3.DatabaseError as error:
                raise SessionError(
                    f"the session database {self.path} is damaged or not a database ({error}); "
                    "move it away to start afresh"
                ) from None
            yield connection
        except sqlite3.DatabaseError as error:
            raise SessionError(f"the session database {self.path} failed: {error}") from None
        finally:
            connection.close()

    def save(self, session: Session) -> Session:
        """Write a session, replacing one of the same name, in one transaction; returns it as stored."""
        check_session_name(session.name)
        options = json.dumps(dict(session.options), sort_keys=True)
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM sessions WHERE name = ?", (session.name,))
                cursor = db.execute(
                    "INSERT INTO sessions (name, model, system, options, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (session.name, session.model, session.system, options, now),
                )
                db.executemany(
                    "INSERT INTO messages (session_id, position, role, content) VALUES (?, ?, ?, ?)",
                    [
                        (cursor.lastrowid, position, _text(m, "role"), _text(m, "content"))
                        for position, m in enumerate(session.messages)
                    ],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Session(
            name=session.name,
            model=session.model,
            system=session.system,
            options=dict(session.options),
            messages=[dict(m) for m in session.messages],
            updated_at=now,
        )

    def load(self, name: str) -> Session:
        check_session_name(name)
        with self._connect() as db:
            db.execute("BEGIN")
            row = db.execute(
                "SELECT id, model, system, options, updated_at FROM sessions WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                raise SessionNotFoundError(f"no saved session named {name!r}")
            messages = db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? ORDER BY position", (row[0],)
            ).fetchall()
            db.execute("COMMIT")
        return Session(
            name=name,
            model=row[1],
            system=row[2],
            options=json.loads(row[3] or "{}"),
            messages=[{"role": role, "content": content} for role, content in messages],
            updated_at=row[4],
        )

    def list(self) -> list[SessionSummary]:
        """All sessions, most recently saved first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.name, s.model, COUNT(m.position), s.updated_at FROM sessions s "
                "LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.updated_at DESC, s.name"
            ).fetchall()
        return [SessionSummary(name, model, count, updated) for name, model, count, updated in rows]

    def delete(self, name: str) -> None:
        check_session_name(name)
        with self._connect() as db:
            if db.execute("DELETE FROM sessions WHERE name = ?", (name,)).rowcount == 0:
                raise SessionNotFoundError(f"no saved session named {name!r}")


def _text(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"a message's {key} must be text, not {value!r}")
    return value
