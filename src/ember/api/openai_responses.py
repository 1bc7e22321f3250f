"""OpenAI's Responses API over ember's conversation store: POST /v1/responses, GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

A response is one turn of a stored conversation:
- with `previous_response_id`, the turn continues from that response's output (an older response gives a new
  branch: the store keeps the tree);
- with `conversation`, it continues that conversation's active branch (the Conversations API, or a native one);
- with neither, it starts a new conversation (origin "responses").
`store: false` answers from the stored history without writing anything. `instructions` is this response's
system prompt (not carried over, as OpenAI documents). `truncation: "auto"` applies the conversation's context
strategy; "disabled" (the default, as OpenAI's) answers 400 when the input does not fit.

Streams are server-sent events: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ..., response.output_text.done,
response.content_part.done, response.output_item.done, function call items, then response.completed
(or response.incomplete when max_output_tokens cut the answer, or response.failed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.api.ollama import PRIORITY_HEADER, first_then_rest, manager_of
from ember.api.responses_protocol import ResponseCreate, input_messages, message_items, response_object, usage
from ember.conversations.db import new_id
from ember.conversations.records import Conversation
from ember.conversations.store import ConversationStore
from ember.conversations.turns import ACTIVE, ConversationService, TurnRequest, TurnResult
from ember.errors import EmberError, InvalidRequestError
from ember.types import ChatResponse

router = APIRouter()


def _service(request: Request) -> ConversationService:
    return request.app.state.conversations


class _Turn:
    """One response being made: its ids, the turn request, and what it writes when it ends."""

    def __init__(self, request: Request, body: ResponseCreate) -> None:
        if body.background:
            raise InvalidRequestError("background responses are not supported; leave background out and wait")
        if body.previous_response_id and body.conversation_id():
            raise InvalidRequestError("give previous_response_id or conversation, not both")
        self.body = body
        self.service = _service(request)
        self.store: ConversationStore = self.service.store
        if not body.model:
            raise InvalidRequestError("name a model in the request's `model` field")
        self.model = body.model
        self.response_id = new_id("resp")
        self.answer_id = new_id("msg")
        self.created_at = time.time()
        self.named_conversation = body.conversation_id()
        self.created_conversation: str | None = None
        self.settings = request.app.state.settings
        self.priority = request.headers.get(PRIORITY_HEADER)

    def prepare(self) -> TurnRequest:
        """Find (or make) the conversation and the point the turn continues from. Runs in a thread."""
        body, messages = self.body, input_messages(self.body.input)
        if not messages and not body.previous_response_id and not self.named_conversation:
            raise InvalidRequestError("input is empty; give text or input items")
        parent: str | None = ACTIVE
        ephemeral = None
        if body.previous_response_id:
            conversation_id, _, output_ids, _ = self.store.responses.get(body.previous_response_id)
            parent = output_ids[-1] if output_ids else ACTIVE
        elif self.named_conversation:
            conversation_id = self.store.get(self.named_conversation).id
        elif body.store:
            title = next((m.content for m in messages if m.role == "user"), "")[:80]
            conversation_id = self.store.create(model=self.model, title=title, origin="responses").id
            self.created_conversation, parent = conversation_id, None
        else:
            ephemeral = Conversation(id=new_id("conv"), model=self.model, origin="responses")
            conversation_id, parent = ephemeral.id, None
        return TurnRequest(
            conversation_id=conversation_id,
            new_messages=messages,
            parent_id=parent,
            model=self.model,
            options=body.native_options(),
            format=body.native_format(),
            tools=body.native_tools(),
            tool_choice=body.native_tool_choice(),
            system=body.instructions,
            override_system=body.instructions is not None,
            strategy=None if body.truncation == "auto" else "none",
            persist=body.store,
            priority=self.priority,
            timeout=self.settings.request_timeout,
            answer_id=self.answer_id,
            conversation=ephemeral,
        )

    def discard(self) -> None:
        """The turn failed before it began: a conversation made for it alone goes too."""
        if self.created_conversation:
            self.store.delete(self.created_conversation)
            self.created_conversation = None

    def response(
        self, status: str, output: list[dict[str, Any]], result: TurnResult | None = None, **extra: Any
    ) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.body,
            model=self.model,
            created_at=self.created_at,
            status=status,
            output=output,
            conversation_id=self.named_conversation,
            usage_=usage(result.final) if result else None,
            context=result.context if result else None,
            **extra,
        )

    def finish(self, result: TurnResult) -> dict[str, Any]:
        """The finished response; stored (with what it added to the conversation) unless store is false."""
        status = "incomplete" if result.final.done_reason == "length" else "completed"
        output = message_items(result.answer, output=True)
        if status == "incomplete":
            for item in output:
                item["status"] = "incomplete"
        data = self.response(status, output, result)
        if self.body.store:
            self.store.responses.save(
                self.response_id, result.conversation.id, [m.id for m in result.added], [result.answer.id], data
            )
        return data


async def _start(request: Request, turn: _Turn) -> AsyncIterator[ChatResponse | TurnResult]:
    try:
        prepared = await asyncio.to_thread(turn.prepare)
        manager_of(request).limits.check_options(prepared.options)
        return await first_then_rest(turn.service.turn(prepared))
    except BaseException:
        await asyncio.to_thread(turn.discard)
        raise


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponseCreate) -> Response:
    turn = _Turn(request, body)
    events = await _start(request, turn)
    if not body.stream:
        try:
            async for event in events:
                if isinstance(event, TurnResult):
                    return JSONResponse(await asyncio.to_thread(turn.finish, event))
        finally:
            await events.aclose()
        raise EmberError("the answer ended without a result")
    return StreamingResponse(_events(turn, events), media_type="text/event-stream")


class _EventWriter:
    """Server-sent events of one response, numbered as the Responses API numbers them."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    def text_opened(self, item_id: str, index: int) -> list[bytes]:
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        return [
            self("response.output_item.added", output_index=index, item=item),
            self("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=_part("")),
        ]

    def item_closed(self, item: dict[str, Any], index: int, *, text_open: bool) -> list[bytes]:
        """The events that finish an output item (and open it first when no text streamed into it)."""
        events = []
        if item["type"] == "message":
            if not text_open:
                events += self.text_opened(item["id"], index)
            text = item["content"][0]["text"]
            position = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(self("response.output_text.done", **position, text=text, logprobs=[]))
            events.append(self("response.content_part.done", **position, part=_part(text)))
        else:
            opened = {**item, "arguments": "", "status": "in_progress"}
            position = {"item_id": item["id"], "output_index": index}
            events.append(self("response.output_item.added", output_index=index, item=opened))
            events.append(self("response.function_call_arguments.delta", **position, delta=item["arguments"]))
            events.append(
                self(
                    "response.function_call_arguments.done", **position, name=item["name"], arguments=item["arguments"]
                )
            )
        events.append(self("response.output_item.done", output_index=index, item=item))
        return events


async def _events(turn: _Turn, events: AsyncIterator[ChatResponse | TurnResult]) -> AsyncIterator[bytes]:
    event = _EventWriter()
    started = turn.response("in_progress", [])
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    text_open = False
    try:
        async for chunk in events:
            if isinstance(chunk, TurnResult):
                final = await asyncio.to_thread(turn.finish, chunk)
                for index, item in enumerate(final["output"]):
                    for line in event.item_closed(item, index, text_open=text_open and index == 0):
                        yield line
                kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                yield event(kind, response=final)
                return
            text = chunk.message.content
            if not text:
                continue
            if not text_open:  # the message item opens with its first text (a call alone has none)
                text_open = True
                for line in event.text_opened(turn.answer_id, 0):
                    yield line
            position = {"item_id": turn.answer_id, "output_index": 0, "content_index": 0}
            yield event("response.output_text.delta", **position, delta=text, logprobs=[])
    except EmberError as error:
        failed = turn.response("failed", [], error={"code": "server_error", "message": str(error)})
        yield event("response.failed", response=failed)
    finally:
        await events.aclose()


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> dict[str, Any]:
    _, _, _, body = await asyncio.to_thread(_service(request).store.responses.get, response_id)
    return body


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    await asyncio.to_thread(_service(request).store.responses.delete, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(
    request: Request,
    response_id: str,
    after: str | None = Query(None, max_length=100),
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    store = _service(request).store

    def items() -> list[dict[str, Any]]:
        conversation_id, input_ids, _, _ = store.responses.get(response_id)
        found = []
        for message_id in input_ids:
            try:
                found += message_items(store.message(conversation_id, message_id))
            except EmberError:  # removed since (Conversations API): no longer an item
                continue
        return found

    return page(await asyncio.to_thread(items), after=after, limit=limit, order=order)


def page(items: list[dict[str, Any]], *, after: str | None, limit: int, order: str) -> dict[str, Any]:
    """A cursor page as openai-python reads one: data, first_id, last_id, has_more."""
    ordered = list(reversed(items)) if order == "desc" else list(items)
    if after is not None:
        position = next((i for i, item in enumerate(ordered) if item["id"] == after), None)
        ordered = ordered[position + 1 :] if position is not None else []
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }
