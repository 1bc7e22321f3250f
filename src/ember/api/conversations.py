"""Native routes for conversations kept by the server (/api/conversations ...).

    POST   /api/conversations                           create (optionally with a starting history)
    GET    /api/conversations?q=&limit=&offset=          list, most recent first; q searches titles and messages
    GET    /api/conversations/{id}?view=path|tree        the active branch, or the whole tree
    PATCH  /api/conversations/{id}                      rename, change system prompt, options, strategy ...
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/chat                 the next turn, streamed as /api/chat streams
    GET    /api/conversations/{id}/context              the context meter as it stands
    POST   /api/conversations/{id}/fork                 branch at a message (here, or into a new conversation)
    GET    /api/conversations/{id}/export               one JSON document ...
    POST   /api/conversations/import                    ... read back as a new conversation
    PATCH  /api/conversations/{id}/messages/{mid}       pin or unpin
    POST   /api/conversations/{id}/messages/{mid}/regenerate   a new answer, as a sibling
    POST   /api/conversations/{id}/messages/{mid}/edit         a new text, as a sibling (a question is answered)
    POST   /api/conversations/{id}/messages/{mid}/continue     more of an answer, written into it

With `progress: true`, a stream also carries {"prefill": {"done", "total"}} lines while a long prompt is read.
Each line of text says how many generated tokens it covers (`tokens`): under load one line can carry several.

An answer's last line (or the whole answer, with stream false) carries `conversation_id`, `message_id` and
`context`: {used, prompt, limit, budget, dropped, summarized, strategy, messages, warning?}.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.api.conversation_bodies import (
    ChatBody,
    ContinueBody,
    ConversationCreate,
    ConversationUpdate,
    EditBody,
    ForkBody,
    MessagePatch,
    RegenerateBody,
)
from ember.api.ollama import PRIORITY_HEADER, chunk_json, first_then_rest, manager_of
from ember.conversations.records import Conversation, check_id
from ember.conversations.store import ConversationStore, NewMessage
from ember.conversations.transfer import ConversationDocument, export_conversation, import_conversation
from ember.conversations.turns import ConversationService, TurnRequest, TurnResult
from ember.errors import EmberError, InvalidRequestError
from ember.store.resolve import resolve_model
from ember.types import ChatResponse

router = APIRouter()


def service_of(request: Request) -> ConversationService:
    return request.app.state.conversations


def store_of(request: Request) -> ConversationStore:
    return service_of(request).store


def conversation_json(conversation: Conversation, messages: list[Any]) -> dict[str, Any]:
    return {"conversation": conversation.to_json(), "messages": [message.to_json() for message in messages]}


# --- answers ---------------------------------------------------------------------------------------------


def turn_json(result: TurnResult, *, whole: bool) -> dict[str, Any]:
    """The last line of an answer (or, `whole`, the collected answer): the model's final chunk and where the
    answer went."""
    data = chunk_json(result.final)
    if whole:
        message: dict[str, Any] = {"role": "assistant", "content": result.answer.content}
        if result.answer.tool_calls:
            message["tool_calls"] = result.answer.tool_calls
        data["message"] = message
    context = dict(result.context)
    if result.prompt_tokens is not None:
        context["prompt_tokens"] = result.prompt_tokens
    data.update(
        conversation_id=result.conversation.id,
        message_id=result.answer.id,
        parent_id=result.answer.parent_id,
        added_message_ids=[message.id for message in result.added],
        partial=False,
        context=context,
    )
    return data


async def answer(request: Request, turn: TurnRequest, stream: bool) -> Response:
    manager_of(request).limits.check_options(turn.options)
    turn.timeout = request.app.state.settings.request_timeout
    if turn.priority is None:
        turn.priority = request.headers.get(PRIORITY_HEADER)
    events = service_of(request).turn(turn)
    if not stream:
        try:
            async for event in events:
                if isinstance(event, TurnResult):
                    return JSONResponse(turn_json(event, whole=True))
        finally:
            await events.aclose()
        raise EmberError("the answer ended without a result")
    return _ndjson(await first_then_rest(events))


def _ndjson(events: AsyncIterator[ChatResponse | TurnResult]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                if isinstance(event, TurnResult):
                    yield (json.dumps(turn_json(event, whole=False)) + "\n").encode()
                elif event.prefill is not None:
                    yield (json.dumps({"prefill": event.prefill.model_dump()}) + "\n").encode()
                elif not event.done:  # the model's final chunk goes out with the result, as one line
                    line = chunk_json(event)
                    if event.tokens:  # several steps' text can travel as one chunk: the page counts tokens
                        line["tokens"] = event.tokens
                    yield (json.dumps(line) + "\n").encode()
        except EmberError as error:
            yield (json.dumps({"error": str(error)}) + "\n").encode()
        finally:
            await events.aclose()  # at once: the partial answer is written when the client goes away

    return StreamingResponse(lines(), media_type="application/x-ndjson")


# --- conversations -------------------------------------------------------------------------------------


def check_options(request: Request, options: dict[str, Any] | None) -> None:
    """A conversation's options are checked when they are given (values and the server's caps), not at its
    first turn."""
    manager_of(request).limits.check_options(options)


@router.post("/api/conversations")
async def create(request: Request, body: ConversationCreate) -> dict[str, Any]:
    check_options(request, body.options)
    model = body.model or request.app.state.settings.default_model
    await asyncio.to_thread(resolve_model, model)  # an unknown model is a 404 now, not at the first turn
    store = store_of(request)
    conversation = await asyncio.to_thread(
        store.create,
        model=model,
        title=body.title,
        system=body.system,
        options=body.options,
        strategy=body.strategy,
        context=body.context_settings.model_dump(exclude_defaults=True) if body.context_settings else None,
        metadata=body.metadata,
        origin=body.origin,
        messages=[message.to_new() for message in body.messages],
    )
    return conversation_json(conversation, await asyncio.to_thread(store.branch, conversation.id))


@router.get("/api/conversations")
async def listing(
    request: Request,
    q: str | None = Query(None, max_length=1000, description="Words to find in titles and messages."),
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=10**9),
    origin: Literal["api", "repl", "responses", "import"] | None = None,
) -> dict[str, Any]:
    rows, total = await asyncio.to_thread(store_of(request).list, limit=limit, offset=offset, query=q, origin=origin)
    following = offset + len(rows)
    return {
        "conversations": [row.to_json() for row in rows],
        "total": total,
        "next_offset": following if following < total else None,
    }


@router.post("/api/conversations/import")
async def import_document(request: Request, body: ConversationDocument) -> dict[str, Any]:
    check_options(request, body.conversation.options)
    store = store_of(request)
    conversation_id = await asyncio.to_thread(import_conversation, store, body)
    conversation, path = await asyncio.to_thread(store.conversation_and_path, conversation_id)
    return conversation_json(conversation, path)


@router.get("/api/conversations/{conversation_id}")
async def get(request: Request, conversation_id: str, view: Literal["path", "tree"] = "path") -> dict[str, Any]:
    store = store_of(request)
    conversation, path = await asyncio.to_thread(store.conversation_and_path, conversation_id)
    if view == "path":
        return conversation_json(conversation, path)
    everything = await asyncio.to_thread(store.messages, conversation_id)
    data = conversation_json(conversation, [m for m in everything if m.kind == "message"])
    data["summaries"] = [m.to_json() for m in everything if m.kind == "summary"]
    data["active_path"] = [m.id for m in path]
    return data


@router.patch("/api/conversations/{conversation_id}")
async def update(request: Request, conversation_id: str, body: ConversationUpdate) -> dict[str, Any]:
    check_options(request, body.options)
    if body.model:
        await asyncio.to_thread(resolve_model, body.model)
    store = store_of(request)
    fields = body.model_dump(exclude_unset=True)
    settings = fields.pop("context_settings", None)
    if settings is not None and body.context_settings is not None:
        fields["context"] = body.context_settings.model_dump(exclude_defaults=True)
    conversation = await asyncio.to_thread(store.update, conversation_id, **fields)
    return conversation_json(conversation, await asyncio.to_thread(store.branch, conversation_id))


@router.delete("/api/conversations/{conversation_id}")
async def delete(request: Request, conversation_id: str) -> dict[str, Any]:
    await asyncio.to_thread(store_of(request).delete, conversation_id)
    return {"id": conversation_id, "deleted": True}


@router.get("/api/conversations/{conversation_id}/export")
async def export(request: Request, conversation_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(export_conversation, store_of(request), conversation_id)


@router.get("/api/conversations/{conversation_id}/context")
async def context(request: Request, conversation_id: str) -> dict[str, Any]:
    check_id(conversation_id, "conv", "conversation")
    return {"conversation_id": conversation_id, "context": await service_of(request).context(conversation_id)}


@router.post("/api/conversations/{conversation_id}/fork")
async def fork(request: Request, conversation_id: str, body: ForkBody) -> dict[str, Any]:
    store = store_of(request)
    if body.new_conversation:
        forked = await asyncio.to_thread(store.fork, conversation_id, body.message_id, title=body.title)
        return conversation_json(forked, await asyncio.to_thread(store.branch, forked.id))
    conversation = await asyncio.to_thread(store.set_active, conversation_id, body.message_id)
    return conversation_json(conversation, await asyncio.to_thread(store.branch, conversation_id))


@router.post("/api/conversations/{conversation_id}/chat")
async def chat(request: Request, conversation_id: str, body: ChatBody) -> Response:
    check_id(conversation_id, "conv", "conversation")
    if body.content is not None and not body.content.strip() and not body.messages:
        raise InvalidRequestError("content is empty; send a message, or leave content out to answer the last one")
    turn = body.turn_request(conversation_id, new_messages=body.to_new_messages())
    return await answer(request, turn, body.stream)


# --- messages ------------------------------------------------------------------------------------------


@router.patch("/api/conversations/{conversation_id}/messages/{message_id}")
async def patch_message(request: Request, conversation_id: str, message_id: str, body: MessagePatch) -> dict[str, Any]:
    message = await asyncio.to_thread(store_of(request).set_pinned, conversation_id, message_id, body.pinned)
    return {"message": message.to_json()}


@router.post("/api/conversations/{conversation_id}/messages/{message_id}/regenerate")
async def regenerate(request: Request, conversation_id: str, message_id: str, body: RegenerateBody) -> Response:
    message = await asyncio.to_thread(store_of(request).message, conversation_id, message_id)
    if message.role != "assistant":
        raise InvalidRequestError(
            f"message {message_id} is a {message.role} message; regenerate an assistant's answer (or edit this one)"
        )
    if message.parent_id is None:
        raise InvalidRequestError(f"message {message_id} answers nothing; there is nothing to answer again")
    return await answer(request, body.turn_request(conversation_id, parent_id=message.parent_id), body.stream)


@router.post("/api/conversations/{conversation_id}/messages/{message_id}/edit")
async def edit(request: Request, conversation_id: str, message_id: str, body: EditBody) -> Response:
    store = store_of(request)
    message = await asyncio.to_thread(store.message, conversation_id, message_id)
    if message.role == "user":
        edited = NewMessage(role="user", content=body.content, pinned=message.pinned)
        turn = body.turn_request(conversation_id, parent_id=message.parent_id, new_messages=[edited])
        return await answer(request, turn, body.stream)
    replacement = NewMessage(
        role=message.role,
        content=body.content,
        pinned=message.pinned,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        tool_name=message.tool_name,
    )
    (stored,) = await asyncio.to_thread(store.append, conversation_id, message.parent_id, [replacement])
    return JSONResponse({"message": stored.to_json()})


@router.post("/api/conversations/{conversation_id}/messages/{message_id}/continue")
async def continue_answer(request: Request, conversation_id: str, message_id: str, body: ContinueBody) -> Response:
    store = store_of(request)
    message = await asyncio.to_thread(store.message, conversation_id, message_id)
    if message.role != "assistant":
        raise InvalidRequestError(f"message {message_id} is a {message.role} message; only an answer can be continued")
    await asyncio.to_thread(store.set_active, conversation_id, message_id)
    turn = body.turn_request(conversation_id, parent_id=message_id, continue_answer=True)
    return await answer(request, turn, body.stream)
