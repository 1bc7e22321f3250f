"""The conversation database: EMBER_HOME/ember.db (SQLite, WAL), its schema, and the migration of old sessions.

Every caller opens its own connection (cheap for SQLite), so the store is safe across threads and processes;
SQLite's locking and a busy timeout order concurrent writers. Each write is one transaction: a killed process
leaves the last committed state, never half a turn.

The schema's version is kept per component in `schema_versions` (other parts of ember keep their own tables in
the same file). Version 1 replaced the REPL's `sessions` and `messages` tables (name, ordered messages) with
conversations and a message tree; databases written before that are migrated on first open.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.errors import DiskFullError, EmberError

_LOW_SPACE = 1024 * 1024  # bytes free under which a failed write is put down to a full disk

BUSY_TIMEOUT_S = 10.0
COMPONENT = "conversations"
VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    system TEXT,
    options TEXT NOT NULL DEFAULT '{}',
    strategy TEXT NOT NULL DEFAULT 'sliding',
    context_settings TEXT NOT NULL DEFAULT '{}',
    context_state TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    origin TEXT NOT NULL DEFAULT 'api',
    active_leaf TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated_at DESC);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'message',
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    tool_calls TEXT,
    tool_call_id TEXT,
    tool_name TEXT,
    status TEXT NOT NULL DEFAULT 'completed',
    pinned INTEGER NOT NULL DEFAULT 0,
    token_count INTEGER,
    token_model TEXT,
    info TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages (parent_id);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TABLE IF NOT EXISTS message_embeddings (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    vector TEXT NOT NULL,
    PRIMARY KEY (message_id, model)
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    input_ids TEXT NOT NULL DEFAULT '[]',
    output_ids TEXT NOT NULL DEFAULT '[]',
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_conversation ON responses (conversation_id);
CREATE TABLE IF NOT EXISTS presets (
    name TEXT PRIMARY KEY,
    system TEXT,
    options TEXT NOT NULL DEFAULT '{}',
    model TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    collection TEXT,
    conversation_id TEXT REFERENCES conversations(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    text TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_collection ON documents (collection);
CREATE INDEX IF NOT EXISTS documents_by_conversation ON documents (conversation_id);
CREATE TABLE IF NOT EXISTS document_chunks (
    id TEXT PRIMARY KEY,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON document_chunks (document_id, seq);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, content='document_chunks', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON document_chunks BEGIN
    INSERT INTO chunks_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON document_chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TABLE IF NOT EXISTS chunk_embeddings (
    chunk_id TEXT NOT NULL REFERENCES document_chunks(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    vector TEXT NOT NULL,
    PRIMARY KEY (chunk_id, model)
);
"""


class ConversationStoreError(EmberError):
    """The conversation database cannot be used (damaged, not a database, unwritable)."""


def _disk_full(error: sqlite3.Error, folder: Path) -> bool:
    """SQLITE_FULL, or an I/O error on a disk with no room left (what SQLite reports when a WAL write fails)."""
    if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE
    except OSError:
        return False


def new_id(prefix: str) -> str:
    """A random id with a readable prefix: conv_, msg_, resp_, doc_, chunk_ (OpenAI's style, so its clients
    accept them)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Database:
    """One SQLite file. `connect()` opens a connection with the pragmas set and the schema ready."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ready = False
        self._ready_lock = threading.Lock()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise ConversationStoreError(f"cannot open the conversation database {self.path}: {error}") from None
        try:
            try:
                connection.execute("PRAGMA foreign_keys = ON")
                if not self._ready:
                    with self._ready_lock:
                        if not self._ready:
                            _prepare(connection)
                            self._ready = True
            except sqlite3.DatabaseError as error:
                raise ConversationStoreError(
                    f"the conversation database {self.path} is damaged or not a database ({error}); "
                    "move it away to start afresh"
                ) from None
            yield connection
        except sqlite3.DatabaseError as error:
            if _disk_full(error, self.path.parent):
                raise DiskFullError(
                    f"the disk holding the conversation database {self.path} is full ({error}); free some space "
                    "and try again: nothing of this request was stored"
                ) from None
            raise ConversationStoreError(f"the conversation database {self.path} failed: {error}") from None
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): one write, all or nothing."""
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


def _prepare(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        legacy = _has_legacy_sessions(db)
        if legacy:  # the old `messages` table is in the way of the new one: move it aside first
            db.execute("ALTER TABLE messages RENAME TO legacy_session_messages")
        _create(db)
        if legacy:
            _migrate_sessions(db)
        db.execute(
            "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
            "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            (COMPONENT, VERSION),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _create(db: sqlite3.Connection) -> None:
    # executescript() would commit the open transaction; run the statements one by one instead.
    for statement in _statements(_SCHEMA):
        db.execute(statement)


def _statements(script: str) -> Iterator[str]:
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""


def _has_legacy_sessions(db: sqlite3.Connection) -> bool:
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "sessions" not in names or "messages" not in names:
        return False
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    return "session_id" in columns and "position" in columns


def _migrate_sessions(db: sqlite3.Connection) -> None:
    """Each saved REPL session becomes a conversation titled with its name, its messages a chain."""
    sessions = db.execute("SELECT id, name, model, system, options, updated_at FROM sessions").fetchall()
    for session_id, name, model, system, options, updated_at in sessions:
        conversation_id = new_id("conv")
        db.execute(
            "INSERT INTO conversations (id, title, model, system, options, strategy, origin, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 'sliding', 'repl', ?, ?)",
            (conversation_id, name, model, system, _json_object(options), updated_at, updated_at),
        )
        parent = None
        rows = db.execute(
            "SELECT role, content FROM legacy_session_messages WHERE session_id = ? ORDER BY position", (session_id,)
        ).fetchall()
        for seq, (role, content) in enumerate(rows):
            message_id = new_id("msg")
            db.execute(
                "INSERT INTO messages (id, conversation_id, parent_id, seq, role, content, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (message_id, conversation_id, parent, seq, role, content, updated_at, updated_at),
            )
            parent = message_id
        db.execute("UPDATE conversations SET active_leaf = ? WHERE id = ?", (parent, conversation_id))
    db.execute("DROP TABLE legacy_session_messages")
    db.execute("DROP TABLE sessions")


def _json_object(text: str | None) -> str:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = {}
    return json.dumps(value if isinstance(value, dict) else {}, sort_keys=True)


def now() -> float:
    return time.time()
