"""The conversation store: conversations and their message trees in EMBER_HOME/ember.db.

    store = ConversationStore()
    conversation = store.create(model="smollm2", title="demo")
    user, = store.append(conversation.id, conversation.active_leaf, [NewMessage("user", "Hi")])
    store.branch(conversation.id)          # the active branch, root first

Every method is one transaction. Messages are never rewritten except the answer being streamed (its content
and status) and a message's pin; editing makes a sibling instead. Full-text search uses SQLite's FTS5 index
of message contents (kept in step by triggers).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.conversations.db import Database, new_id, now
from ember.conversations.documents import DocumentStore
from ember.conversations.index import MessageIndex, fts_query
from ember.conversations.records import (
    Conversation,
    ConversationNotFoundError,
    ConversationSummary,
    StoredMessage,
    check_id,
    check_strategy,
    context_settings,
)
from ember.conversations.responses import ResponseRecords
from ember.errors import InvalidRequestError

_MESSAGE_COLUMNS = (
    "id, conversation_id, parent_id, seq, role, content, kind, tool_calls, tool_call_id, tool_name, status, "
    "pinned, token_count, token_model, info, created_at, updated_at"
)
_CONVERSATION_COLUMNS = (
    "id, title, model, system, options, strategy, context_settings, context_state, metadata, origin, active_leaf, "
    "created_at, updated_at"
)
_ROLES = ("system", "user", "assistant", "tool")
MAX_TITLE = 200


@dataclass
class NewMessage:
    """A message to append; the store gives it its parent, its order and (unless given) its id."""

    role: str
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    status: str = "completed"
    pinned: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise InvalidRequestError(f"a message's role must be one of {', '.join(_ROLES)}, not {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidRequestError("a message's content must be text")

    def stored(self, *, id: str, conversation_id: str, parent_id: str | None, seq: int, stamp: float) -> StoredMessage:
        """The message as the store keeps it, at `seq` under `parent_id`, created and updated at `stamp`."""
        return StoredMessage(
            id=id,
            conversation_id=conversation_id,
            parent_id=parent_id,
            seq=seq,
            role=self.role,
            content=self.content,
            tool_calls=self.tool_calls,
            tool_call_id=self.tool_call_id,
            tool_name=self.tool_name,
            status=self.status,
            pinned=self.pinned,
            info=dict(self.info),
            created_at=stamp,
            updated_at=stamp,
        )


def default_path() -> Path:
    from ember.config import Settings

    return Settings().home / "ember.db"


class ConversationStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.db = Database(path if path is not None else default_path())
        self.responses = ResponseRecords(self.db)
        self.index = MessageIndex(self.db)
        self.documents = DocumentStore(self.db)

    @property
    def path(self) -> Path:
        return self.db.path

    # --- conversations -------------------------------------------------------------------------------

    def create(
        self,
        *,
        model: str = "",
        title: str = "",
        system: str | None = None,
        options: dict[str, Any] | None = None,
        strategy: str = "sliding",
        context: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        origin: str = "api",
        messages: Sequence[NewMessage] = (),
    ) -> Conversation:
        check_strategy(strategy)
        settings = context_settings(context).model_dump(exclude_defaults=True)
        conversation_id = new_id("conv")
        stamp = now()
        with self.db.transaction() as db:
            db.execute(
                f"INSERT INTO conversations ({_CONVERSATION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?, ?, NULL, ?, ?)",
                (
                    conversation_id,
                    _title(title),
                    model,
                    system,
                    dump_object(options),
                    strategy,
                    dump_object(settings),
                    dump_object(metadata),
                    origin,
                    stamp,
                    stamp,
                ),
            )
            if messages:
                self._insert(db, conversation_id, None, messages, stamp)
            return self._conversation(db, conversation_id)

    def get(self, conversation_id: str) -> Conversation:
        check_id(conversation_id, "conv", "conversation")
        with self.db.connect() as db:
            return self._conversation(db, conversation_id)

    def find(self, name_or_id: str) -> Conversation:
        """By id, else the most recently updated conversation with exactly that title."""
        if name_or_id.startswith("conv_"):
            return self.get(name_or_id)
        with self.db.connect() as db:
            row = db.execute(
                "SELECT id FROM conversations WHERE title = ? ORDER BY updated_at DESC LIMIT 1", (name_or_id,)
            ).fetchone()
            if row is None:
                raise ConversationNotFoundError(f"no conversation with the id or title {name_or_id!r}")
            return self._conversation(db, row[0])

    def list(
        self, *, limit: int = 20, offset: int = 0, query: str | None = None, origin: str | None = None
    ) -> tuple[list[ConversationSummary], int]:
        """A page of conversations, most recently updated first, and how many there are in all. With a query:
        those whose title contains it or whose messages contain all its words (with a snippet)."""
        conditions, parameters, snippets = [], [], {}
        if origin:
            conditions.append("c.origin = ?")
            parameters.append(origin)
        with self.db.snapshot() as db:
            if query:
                snippets = self._search(db, query)
                like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                marks = ", ".join("?" * len(snippets))
                conditions.append(
                    f"(c.title LIKE ? ESCAPE '\\' OR c.id IN ({marks}))" if snippets else "c.title LIKE ? ESCAPE '\\'"
                )
                parameters += [like, *snippets]
            where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
            total = db.execute(f"SELECT COUNT(*) FROM conversations c {where}", parameters).fetchone()[0]
            rows = db.execute(
                "SELECT c.id, c.title, c.model, c.origin, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND m.kind = 'message') "
                f"FROM conversations c {where} ORDER BY c.updated_at DESC, c.id LIMIT ? OFFSET ?",
                [*parameters, max(1, min(limit, 1000)), max(0, offset)],
            ).fetchall()
        summaries = [
            ConversationSummary(
                id=row[0],
                title=row[1],
                model=row[2],
                origin=row[3],
                message_count=row[6],
                created_at=row[4],
                updated_at=row[5],
                snippet=snippets.get(row[0]) if query else None,
            )
            for row in rows
        ]
        return summaries, total

    def _search(self, db: sqlite3.Connection, query: str) -> dict[str, str]:
        match = fts_query(query, any_word=False)
        if match is None:
            return {}
        rows = db.execute(
            "SELECT m.conversation_id, snippet(messages_fts, 0, '[', ']', '…', 12) FROM messages_fts "
            "JOIN messages m ON m.rowid = messages_fts.rowid WHERE messages_fts MATCH ? AND m.kind = 'message' "
            "ORDER BY rank LIMIT 2000",
            (match,),
        ).fetchall()
        found: dict[str, str] = {}
        for conversation_id, snippet in rows:
            found.setdefault(conversation_id, snippet)
        return found

    def update(self, conversation_id: str, **fields: Any) -> Conversation:
        """Change title, model, system, options, strategy, context (settings) or metadata; None leaves one as is."""
        columns = {
            "title": lambda v: _title(v),
            "model": lambda v: v,
            "system": lambda v: v or None,
            "options": dump_object,
            "strategy": check_strategy,
            "context": lambda v: dump_object(context_settings(v).model_dump(exclude_defaults=True)),
            "metadata": dump_object,
        }
        unknown = set(fields) - set(columns)
        if unknown:
            raise InvalidRequestError(f"cannot change {', '.join(sorted(unknown))} of a conversation")
        changes = {name: columns[name](value) for name, value in fields.items() if value is not None}
        check_id(conversation_id, "conv", "conversation")
        with self.db.transaction() as db:
            self._conversation(db, conversation_id)
            for name, value in changes.items():
                column = "context_settings" if name == "context" else name
                db.execute(f"UPDATE conversations SET {column} = ? WHERE id = ?", (value, conversation_id))
            if "strategy" in changes:  # the old strategy's bookkeeping means nothing to the new one
                db.execute("UPDATE conversations SET context_state = '{}' WHERE id = ?", (conversation_id,))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now(), conversation_id))
            return self._conversation(db, conversation_id)

    def delete(self, conversation_id: str) -> None:
        check_id(conversation_id, "conv", "conversation")
        with self.db.transaction() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise ConversationNotFoundError(f"no conversation {conversation_id!r}")

    def set_context_state(self, conversation_id: str, state: dict[str, Any]) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE conversations SET context_state = ? WHERE id = ?", (dump_object(state), conversation_id))

    # --- messages ------------------------------------------------------------------------------------

    def messages(self, conversation_id: str) -> list[StoredMessage]:
        """The whole tree (and any summaries), in the order the messages were written."""
        check_id(conversation_id, "conv", "conversation")
        with self.db.snapshot() as db:
            self._conversation(db, conversation_id)
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()
        return [_message(row) for row in rows]

    def branch(self, conversation_id: str, leaf: str | None = None) -> list[StoredMessage]:
        """The branch ending at `leaf` (default: the active leaf), root first."""
        check_id(conversation_id, "conv", "conversation")
        with self.db.snapshot() as db:
            conversation = self._conversation(db, conversation_id)
            return self._path(db, conversation_id, leaf if leaf is not None else conversation.active_leaf)

    def conversation_and_path(
        self, conversation_id: str, leaf: str | None = None
    ) -> tuple[Conversation, list[StoredMessage]]:
        check_id(conversation_id, "conv", "conversation")
        with self.db.snapshot() as db:
            conversation = self._conversation(db, conversation_id)
            return conversation, self._path(db, conversation_id, leaf if leaf is not None else conversation.active_leaf)

    def _path(self, db: sqlite3.Connection, conversation_id: str, leaf: str | None) -> list[StoredMessage]:
        if leaf is None:
            return []
        rows = db.execute(
            "WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT m.parent_id, chain.depth + 1 FROM messages m JOIN chain ON m.id = chain.id "
            "WHERE m.parent_id IS NOT NULL) "
            f"SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))} FROM chain "
            "JOIN messages m ON m.id = chain.id WHERE m.conversation_id = ? ORDER BY chain.depth DESC",
            (leaf, conversation_id),
        ).fetchall()
        if not rows:
            raise ConversationNotFoundError(f"no message {leaf!r} in conversation {conversation_id!r}")
        return [_message(row) for row in rows]

    def message(self, conversation_id: str, message_id: str) -> StoredMessage:
        check_id(conversation_id, "conv", "conversation")
        check_id(message_id, "msg", "message")
        with self.db.connect() as db:
            row = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND conversation_id = ?",
                (message_id, conversation_id),
            ).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no message {message_id!r} in conversation {conversation_id!r}")
        return _message(row)

    def append(
        self,
        conversation_id: str,
        parent_id: str | None,
        messages: Sequence[NewMessage],
        *,
        make_active: bool = True,
        context_state: dict[str, Any] | None = None,
        token_counts: Iterable[tuple[str, int, str]] = (),
    ) -> list[StoredMessage]:
        """Add a chain of messages under `parent_id` (None: a new root) in one transaction; the last becomes the
        active leaf unless make_active is False. A turn also saves its strategy's state and the token counts it
        measured in the same transaction."""
        check_id(conversation_id, "conv", "conversation")
        stamp = now()
        with self.db.transaction() as db:
            self._conversation(db, conversation_id)
            if parent_id is not None:
                self._require_message(db, conversation_id, parent_id)
            stored = self._insert(db, conversation_id, parent_id, messages, stamp, make_active=make_active)
            if context_state is not None:
                db.execute(
                    "UPDATE conversations SET context_state = ? WHERE id = ?",
                    (dump_object(context_state), conversation_id),
                )
            rows = [(count, model, message_id) for message_id, count, model in token_counts]
            db.executemany("UPDATE messages SET token_count = ?, token_model = ? WHERE id = ?", rows)
        return stored

    def _insert(
        self,
        db: sqlite3.Connection,
        conversation_id: str,
        parent_id: str | None,
        messages: Iterable[NewMessage],
        stamp: float,
        *,
        make_active: bool = True,
    ) -> list[StoredMessage]:
        seq = db.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()[0]
        stored, parent = [], parent_id
        for message in messages:
            message_id = message.id or new_id("msg")
            db.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'message', ?, ?, ?, ?, ?, "
                "NULL, NULL, ?, ?, ?)",
                (
                    message_id,
                    conversation_id,
                    parent,
                    seq,
                    message.role,
                    message.content,
                    json.dumps(message.tool_calls) if message.tool_calls else None,
                    message.tool_call_id,
                    message.tool_name,
                    message.status,
                    int(message.pinned),
                    dump_object(message.info),
                    stamp,
                    stamp,
                ),
            )
            stored.append(
                message.stored(id=message_id, conversation_id=conversation_id, parent_id=parent, seq=seq, stamp=stamp)
            )
            parent, seq = message_id, seq + 1
        if stored and make_active:
            db.execute("UPDATE conversations SET active_leaf = ? WHERE id = ?", (parent, conversation_id))
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (stamp, conversation_id))
        return stored

    def write_answer(
        self,
        message_id: str,
        *,
        content: str,
        status: str,
        tool_calls: list[dict[str, Any]] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        """Rewrite the answer being streamed (the only message that changes after it is written)."""
        with self.db.transaction() as db:
            stamp = now()
            db.execute(
                "UPDATE messages SET content = ?, status = ?, tool_calls = ?, info = COALESCE(?, info), "
                "updated_at = ? WHERE id = ?",
                (
                    content,
                    status,
                    json.dumps(tool_calls) if tool_calls else None,
                    dump_object(info) if info is not None else None,
                    stamp,
                    message_id,
                ),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ? "
                "WHERE id = (SELECT conversation_id FROM messages WHERE id = ?)",
                (stamp, message_id),
            )

    def remove_message(self, conversation_id: str, message_id: str) -> None:
        """Take one message out: its children move up to its parent; an active leaf moves to the parent too."""
        with self.db.transaction() as db:
            message = self._require_message(db, conversation_id, message_id)
            db.execute("UPDATE messages SET parent_id = ? WHERE parent_id = ?", (message.parent_id, message_id))
            db.execute(
                "UPDATE conversations SET active_leaf = ?, updated_at = ? WHERE id = ? AND active_leaf = ?",
                (message.parent_id, now(), conversation_id, message_id),
            )
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def set_pinned(self, conversation_id: str, message_id: str, pinned: bool) -> StoredMessage:
        with self.db.transaction() as db:
            self._require_message(db, conversation_id, message_id)
            db.execute("UPDATE messages SET pinned = ? WHERE id = ?", (int(pinned), message_id))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now(), conversation_id))
        return self.message(conversation_id, message_id)

    def set_active(self, conversation_id: str, message_id: str | None) -> Conversation:
        with self.db.transaction() as db:
            if message_id is not None:
                self._require_message(db, conversation_id, message_id)
            db.execute(
                "UPDATE conversations SET active_leaf = ?, updated_at = ? WHERE id = ?",
                (message_id, now(), conversation_id),
            )
            return self._conversation(db, conversation_id)

    def set_token_counts(self, counts: Iterable[tuple[str, int, str]]) -> None:
        """Cache per-message token counts (message id, count, the tokenizer they were counted with)."""
        rows = [(count, model, message_id) for message_id, count, model in counts]
        if rows:
            with self.db.transaction() as db:
                db.executemany("UPDATE messages SET token_count = ?, token_model = ? WHERE id = ?", rows)

    def fork(self, conversation_id: str, message_id: str, *, title: str | None = None) -> Conversation:
        """A new conversation holding a copy of the branch that ends at `message_id`."""
        with self.db.transaction() as db:
            source = self._conversation(db, conversation_id)
            self._require_message(db, conversation_id, message_id)
            branch = self._path(db, conversation_id, message_id)
            fork_id, stamp = new_id("conv"), now()
            db.execute(
                f"INSERT INTO conversations ({_CONVERSATION_COLUMNS}) SELECT ?, ?, model, system, options, strategy, "
                "context_settings, '{}', metadata, origin, NULL, ?, ? FROM conversations WHERE id = ?",
                (fork_id, _title(title if title is not None else source.title), stamp, stamp, conversation_id),
            )
            self._insert(db, fork_id, None, [_copy(message) for message in branch], stamp)
            return self._conversation(db, fork_id)

    # --- summaries ----------------------------------------------------------------------------------

    def add_summary(self, conversation_id: str, content: str, info: dict[str, Any]) -> StoredMessage:
        stamp = now()
        with self.db.transaction() as db:
            message_id = new_id("msg")
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()[0]
            db.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, NULL, ?, 'system', ?, 'summary', NULL, NULL, "
                "NULL, 'completed', 0, NULL, NULL, ?, ?, ?)",
                (message_id, conversation_id, seq, content, dump_object(info), stamp, stamp),
            )
        return StoredMessage(
            id=message_id,
            conversation_id=conversation_id,
            parent_id=None,
            seq=seq,
            role="system",
            content=content,
            kind="summary",
            info=dict(info),
            created_at=stamp,
            updated_at=stamp,
        )

    def summary(self, conversation_id: str, message_id: str) -> StoredMessage | None:
        with self.db.connect() as db:
            row = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND conversation_id = ? AND kind = 'summary'",
                (message_id, conversation_id),
            ).fetchone()
        return _message(row) if row is not None else None

    # --- internals -----------------------------------------------------------------------------------

    def _conversation(self, db: sqlite3.Connection, conversation_id: str) -> Conversation:
        row = db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no conversation {conversation_id!r}")
        return Conversation(
            id=row[0],
            title=row[1],
            model=row[2],
            system=row[3],
            options=json.loads(row[4]),
            strategy=row[5],
            context=json.loads(row[6]),
            context_state=json.loads(row[7]),
            metadata=json.loads(row[8]),
            origin=row[9],
            active_leaf=row[10],
            created_at=row[11],
            updated_at=row[12],
        )

    def _require_message(self, db: sqlite3.Connection, conversation_id: str, message_id: str) -> StoredMessage:
        check_id(message_id, "msg", "message")
        row = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ? AND conversation_id = ? AND kind = 'message'",
            (message_id, conversation_id),
        ).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no message {message_id!r} in conversation {conversation_id!r}")
        return _message(row)


def _message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        id=row[0],
        conversation_id=row[1],
        parent_id=row[2],
        seq=row[3],
        role=row[4],
        content=row[5],
        kind=row[6],
        tool_calls=json.loads(row[7]) if row[7] else None,
        tool_call_id=row[8],
        tool_name=row[9],
        status=row[10],
        pinned=bool(row[11]),
        token_count=row[12],
        token_model=row[13],
        info=json.loads(row[14] or "{}"),
        created_at=row[15],
        updated_at=row[16],
    )


def _copy(message: StoredMessage) -> NewMessage:
    return NewMessage(
        role=message.role,
        content=message.content,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        tool_name=message.tool_name,
        status=message.status,
        pinned=message.pinned,
        info=dict(message.info),
    )


def _title(value: str | None) -> str:
    text = " ".join((value or "").split())
    return text[:MAX_TITLE]


def dump_object(value: dict[str, Any] | None) -> str:
    if value is not None and not isinstance(value, dict):
        raise InvalidRequestError("options, metadata and context settings must be JSON objects")
    return json.dumps(value or {}, sort_keys=True)
