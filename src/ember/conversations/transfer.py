"""Export and import: a whole conversation (its tree, branches, pins and summaries) as one JSON document.

    document = export_conversation(store, "conv_...")
    copy = import_conversation(store, document)       # a new conversation, with new ids, of the same shape

Import checks the document before writing anything: every parent must come before its children (so the tree
has no cycles), roles are the known ones, and it is written in one transaction.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.conversations.db import new_id, now
from ember.conversations.records import STRATEGIES, ContextSettings, check_strategy
from ember.conversations.store import ConversationStore, dump_object
from ember.errors import InvalidRequestError

FORMAT = "ember.conversation"
VERSION = 1


class ExportedMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=200)
    parent_id: str | None = None
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    kind: Literal["message", "summary"] = "message"
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    pinned: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = None


class ExportedConversation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    title: str = Field("", max_length=1000)
    model: str = ""
    system: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    strategy: str = Field("sliding", description=f"One of {', '.join(STRATEGIES)}.")
    context_settings: ContextSettings = Field(default_factory=ContextSettings)
    metadata: dict[str, Any] = Field(default_factory=dict)
    active_leaf: str | None = None
    created_at: float | None = None


class ConversationDocument(BaseModel):
    """One conversation as `GET /api/conversations/{id}/export` writes it and `POST /api/conversations/import`
    reads it."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["ember.conversation"] = FORMAT
    version: int = Field(VERSION, ge=1, le=VERSION)
    conversation: ExportedConversation
    messages: list[ExportedMessage] = Field(default_factory=list, max_length=100_000)


def export_conversation(store: ConversationStore, conversation_id: str) -> dict[str, Any]:
    conversation = store.get(conversation_id)
    messages = store.messages(conversation_id)
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.time(),
        "conversation": {
            "title": conversation.title,
            "model": conversation.model,
            "system": conversation.system,
            "options": conversation.options,
            "strategy": conversation.strategy,
            "context_settings": conversation.settings.model_dump(),
            "metadata": conversation.metadata,
            "active_leaf": conversation.active_leaf,
            "created_at": conversation.created_at,
        },
        "messages": [
            {
                "id": m.id,
                "parent_id": m.parent_id,
                "role": m.role,
                "content": m.content,
                "kind": m.kind,
                "tool_calls": m.tool_calls,
                "tool_call_id": m.tool_call_id,
                "tool_name": m.tool_name,
                "status": m.status,
                "pinned": m.pinned,
                "info": m.info,
                "created_at": m.created_at,
            }
            for m in messages
        ],
    }


def import_conversation(store: ConversationStore, document: ConversationDocument, *, title: str | None = None) -> str:
    """Write the document as a new conversation; returns its id."""
    source = document.conversation
    check_strategy(source.strategy)
    ids: dict[str, str] = {}
    for index, message in enumerate(document.messages):
        if message.id in ids:
            raise InvalidRequestError(f"messages[{index}]: the id {message.id!r} appears twice")
        if message.kind == "message" and message.parent_id is not None and message.parent_id not in ids:
            raise InvalidRequestError(
                f"messages[{index}]: its parent {message.parent_id!r} must come before it in the document"
            )
        ids[message.id] = new_id("msg")
    if source.active_leaf is not None and source.active_leaf not in ids:
        raise InvalidRequestError(f"conversation.active_leaf {source.active_leaf!r} is not one of the messages")
    conversation_id, stamp = new_id("conv"), now()
    with store.db.transaction() as db:
        db.execute(
            "INSERT INTO conversations (id, title, model, system, options, strategy, context_settings, context_state, "
            "metadata, origin, active_leaf, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?, 'import', "
            "?, ?, ?)",
            (
                conversation_id,
                " ".join((title if title is not None else source.title).split())[:200],
                source.model,
                source.system,
                dump_object(source.options),
                source.strategy,
                dump_object(source.context_settings.model_dump(exclude_defaults=True)),
                dump_object(source.metadata),
                ids.get(source.active_leaf or ""),
                source.created_at or stamp,
                stamp,
            ),
        )
        for seq, message in enumerate(document.messages):
            info = dict(message.info)
            if message.kind == "summary":  # what a summary covers is named by message ids: map them too
                info["through"] = ids.get(info.get("through") or "")
                info["covers"] = [ids[i] for i in info.get("covers", ()) if isinstance(i, str) and i in ids]
            db.execute(
                "INSERT INTO messages (id, conversation_id, parent_id, seq, kind, role, content, tool_calls, "
                "tool_call_id, tool_name, status, pinned, info, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ids[message.id],
                    conversation_id,
                    ids[message.parent_id] if message.kind == "message" and message.parent_id else None,
                    seq,
                    message.kind,
                    message.role,
                    message.content,
                    _json_list(message.tool_calls),
                    message.tool_call_id,
                    message.tool_name,
                    message.status,
                    int(message.pinned),
                    dump_object(info),
                    message.created_at or stamp,
                    stamp,
                ),
            )
    return conversation_id


def _json_list(value: list[dict[str, Any]] | None) -> str | None:
    return json.dumps(value) if value else None
