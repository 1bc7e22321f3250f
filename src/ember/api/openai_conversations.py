"""OpenAI's Conversations API over ember's conversation store: /v1/conversations and its items.

A conversation made here is an ember conversation (origin "responses") like any other: /api/conversations
lists it, and /v1/responses continues it with `conversation`. Its items are the messages of its active branch,
oldest first (listed newest first by default, as OpenAI does).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from ember.api.openai_responses import page
from ember.api.responses_protocol import (
    ConversationCreateBody,
    ConversationUpdateBody,
    ItemsCreateBody,
    input_messages,
    message_items,
    parse_item_id,
)
from ember.conversations.records import Conversation, ConversationNotFoundError
from ember.conversations.store import ConversationStore

router = APIRouter()


def _store(request: Request) -> ConversationStore:
    return request.app.state.conversations.store


def conversation_object(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "object": "conversation",
        "created_at": int(conversation.created_at),
        "metadata": conversation.metadata,
    }


def _items(store: ConversationStore, conversation_id: str) -> list[dict[str, Any]]:
    return [item for message in store.branch(conversation_id) for item in message_items(message)]


@router.post("/v1/conversations")
async def create_conversation(request: Request, body: ConversationCreateBody) -> dict[str, Any]:
    messages = input_messages(body.items or [])
    conversation = await asyncio.to_thread(
        _store(request).create, metadata=body.metadata, origin="responses", messages=messages
    )
    return conversation_object(conversation)


@router.get("/v1/conversations/{conversation_id}")
async def retrieve_conversation(request: Request, conversation_id: str) -> dict[str, Any]:
    return conversation_object(await asyncio.to_thread(_store(request).get, conversation_id))


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(request: Request, conversation_id: str, body: ConversationUpdateBody) -> dict[str, Any]:
    conversation = await asyncio.to_thread(_store(request).update, conversation_id, metadata=body.metadata)
    return conversation_object(conversation)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(request: Request, conversation_id: str) -> dict[str, Any]:
    await asyncio.to_thread(_store(request).delete, conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(
    request: Request,
    conversation_id: str,
    after: str | None = Query(None, max_length=100),
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    items = await asyncio.to_thread(_items, _store(request), conversation_id)
    return page(items, after=after, limit=limit, order=order)


@router.post("/v1/conversations/{conversation_id}/items")
async def create_items(request: Request, conversation_id: str, body: ItemsCreateBody) -> dict[str, Any]:
    store = _store(request)

    def add() -> list[dict[str, Any]]:
        conversation = store.get(conversation_id)
        added = store.append(conversation_id, conversation.active_leaf, input_messages(body.items))
        return [item for message in added for item in message_items(message)]

    return page(await asyncio.to_thread(add), after=None, limit=100, order="asc")


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(request: Request, conversation_id: str, item_id: str) -> dict[str, Any]:
    store = _store(request)
    message_id, _ = parse_item_id(item_id)
    message = await asyncio.to_thread(store.message, conversation_id, message_id)
    for item in message_items(message):
        if item["id"] == item_id:
            return item
    raise ConversationNotFoundError(f"no item {item_id!r} in conversation {conversation_id!r}")


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(request: Request, conversation_id: str, item_id: str) -> dict[str, Any]:
    """Removes the message the item belongs to (a function call goes with its assistant message)."""
    store = _store(request)
    message_id, _ = parse_item_id(item_id)

    def remove() -> Conversation:
        store.remove_message(conversation_id, message_id)
        return store.get(conversation_id)

    return conversation_object(await asyncio.to_thread(remove))
