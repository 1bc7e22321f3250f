"""The conversation database: EMBER_HOME/ember.db (SQLite, WAL), its schema, and the migration of old sessions.

Every caller opens its own connection (cheap for SQLite), so the store is safe across threads and processes;
SQLite's locking and a busy timeout order concurrent writers. Each write is one transaction: a killed process
leaves the last committed state, never half a turn.

The file is shared with the other parts of ember that keep state (ember/database.py: connections, versions,
errors). Version 1 replaced the REPL's `sessions` and `messages` tables (name, ordered messages) with
conversations and a message tree; databases written before that are migrated on first open.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path

from ember.database import DatabaseError, SharedDatabase, statements

COMPONENT = "conversations"

_SCHEMA = """
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


class ConversationStoreError(DatabaseError):
    """The conversation database cannot be used (damaged, not a database, unwritable)."""


def new_id(prefix: str) -> str:
    """A random id with a readable prefix: conv_, msg_, resp_, doc_, chunk_ (OpenAI's style, so its clients
    accept them)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _version_1(db: sqlite3.Connection) -> None:
    """The conversation tables; the REPL's saved sessions of earlier releases become conversations."""
    legacy = _has_legacy_sessions(db)
    if legacy:  # the old `messages` table is in the way of the new one: move it aside first
        db.execute("ALTER TABLE messages RENAME TO legacy_session_messages")
    for statement in statements(_SCHEMA):
        db.execute(statement)
    if legacy:
        _migrate_sessions(db)


class Database(SharedDatabase):
    """The conversation tables in the SQLite file at `path`: `connect()`, `transaction()`, `snapshot()`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            path,
            COMPONENT,
            (_version_1,),
            description="the conversation database",
            error=ConversationStoreError,
            rows_by_name=False,
        )


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
