"""Where the REPL keeps its conversation and gets its answers: the running server's /api/conversations when one
answers, else the same conversation service in this process (the same store file, EMBER_HOME/ember.db, and a
model manager with its runner process). Either way a conversation made in the REPL is one the API lists, and
the REPL can resume any conversation the API made.

Both clients speak in the route's JSON shapes: `chat()` yields the NDJSON lines of POST
/api/conversations/{id}/chat (the last one with `context` and `message_id`). Closing the iterator of an answer
cancels it; the part already written stays in the conversation, marked incomplete.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from ember.cli import remote


class ConversationClient(Protocol):
    def create(self, **fields: Any) -> dict[str, Any]: ...
    def update(self, conversation_id: str, **fields: Any) -> dict[str, Any]: ...
    def get(self, name_or_id: str) -> dict[str, Any]: ...
    def list(self, query: str | None = None, limit: int = 20) -> list[dict[str, Any]]: ...
    def chat(
        self, conversation_id: str, content: str, options: dict[str, Any], format_: Any
    ) -> Iterator[dict[str, Any]]: ...
    def context(self, conversation_id: str) -> dict[str, Any]: ...
    def facts(self, model: str) -> dict[str, Any]: ...
    def load(self, model: str, load: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class RemoteConversations:
    """The server at EMBER_HOST."""

    def create(self, **fields: Any) -> dict[str, Any]:
        return remote.request("POST", "/api/conversations", fields)

    def update(self, conversation_id: str, **fields: Any) -> dict[str, Any]:
        return remote.request("PATCH", f"/api/conversations/{conversation_id}", fields)

    def get(self, name_or_id: str) -> dict[str, Any]:
        if not name_or_id.startswith("conv_"):
            matches = [row for row in self.list(name_or_id, limit=1000) if row["title"] == name_or_id]
            if not matches:
                from ember.conversations.records import ConversationNotFoundError

                raise ConversationNotFoundError(f"no conversation with the id or title {name_or_id!r}")
            name_or_id = matches[0]["id"]
        return remote.request("GET", f"/api/conversations/{name_or_id}")

    def list(self, query: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        from urllib.parse import urlencode

        parameters = {"limit": limit, **({"q": query} if query else {})}
        return remote.request("GET", f"/api/conversations?{urlencode(parameters)}")["conversations"]

    def chat(
        self, conversation_id: str, content: str, options: dict[str, Any], format_: Any
    ) -> Iterator[dict[str, Any]]:
        body: dict[str, Any] = {"content": content, "options": options, "stream": True}
        if format_ is not None:
            body["format"] = format_
        yield from remote.stream(f"/api/conversations/{conversation_id}/chat", body)

    def context(self, conversation_id: str) -> dict[str, Any]:
        return remote.request("GET", f"/api/conversations/{conversation_id}/context")["context"]

    def facts(self, model: str) -> dict[str, Any]:
        return remote.show(model)[0]

    def load(self, model: str, load: dict[str, Any]) -> None:
        remote.load(model, load)

    def close(self) -> None:
        pass


class LocalConversations:
    """The conversation service in this process, on an event loop of its own (a thread), so the REPL can stay
    a plain loop over input() while the model manager and its runner work asynchronously."""

    def __init__(self) -> None:
        from ember.config import Settings
        from ember.conversations.store import ConversationStore
        from ember.conversations.turns import ConversationService
        from ember.serve.manager import ModelManager

        settings = Settings()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ember-conversations", daemon=True)
        self._thread.start()
        self.manager = ModelManager(default_options={"num_parallel": 1}, keep_alive=None, max_loaded=1)
        self.service = ConversationService(
            ConversationStore(settings.home / "ember.db"), self.manager, default_model=settings.default_model
        )
        self.store = self.service.store

    def _run(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def create(self, **fields: Any) -> dict[str, Any]:
        from ember.api.conversations import conversation_json

        conversation = self.store.create(**fields)
        return conversation_json(conversation, [])

    def update(self, conversation_id: str, **fields: Any) -> dict[str, Any]:
        from ember.api.conversations import conversation_json

        conversation = self.store.update(conversation_id, **fields)
        return conversation_json(conversation, self.store.branch(conversation_id))

    def get(self, name_or_id: str) -> dict[str, Any]:
        from ember.api.conversations import conversation_json

        conversation = self.store.find(name_or_id)
        return conversation_json(conversation, self.store.branch(conversation.id))

    def list(self, query: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        rows, _ = self.store.list(query=query, limit=limit)
        return [row.to_json() for row in rows]

    def chat(
        self, conversation_id: str, content: str, options: dict[str, Any], format_: Any
    ) -> Iterator[dict[str, Any]]:
        from ember.api.conversations import turn_json
        from ember.api.ollama import chunk_json
        from ember.conversations.store import NewMessage
        from ember.conversations.turns import TurnRequest, TurnResult

        request = TurnRequest(
            conversation_id, new_messages=[NewMessage(role="user", content=content)], options=options, format=format_
        )

        async def lines() -> AsyncIterator[dict[str, Any]]:
            async for event in self.service.turn(request):
                if isinstance(event, TurnResult):
                    yield turn_json(event, whole=False)
                elif not event.done:
                    yield chunk_json(event)

        yield from self._iterate(lines)

    def _iterate(self, make: Callable[[], AsyncIterator[Any]]) -> Iterator[Any]:
        """An async iterator, read from this thread. Leaving early (Ctrl-C, close) cancels it on the loop and
        waits until its cleanup (keeping the partial answer) is done."""
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        finished = threading.Event()

        async def pump() -> None:
            try:
                async for item in make():
                    items.put(("item", item))
                items.put(("end", None))
            except Exception as error:
                items.put(("error", error))
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                kind, value = items.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            if not finished.is_set():
                self._loop.call_soon_threadsafe(future.cancel)
                finished.wait(timeout=30)

    def context(self, conversation_id: str) -> dict[str, Any]:
        return self._run(lambda: self.service.context(conversation_id))

    def facts(self, model: str) -> dict[str, Any]:
        from ember.cli.models import model_facts
        from ember.store.gguf_file import read_gguf

        source, counter = self._run(lambda: self.service.source(model))
        facts = model_facts(source, read_gguf(source.path))
        facts["template"] = facts["template"] or counter.prompts.template_source
        return facts

    def load(self, model: str, load: dict[str, Any]) -> None:
        """Load the model now (as the server's client does), so the first answer does not wait for it."""
        from ember.types import ChatRequest

        async def load_only() -> None:
            async for _ in self.manager.chat(ChatRequest(model=model, options=load)):
                pass

        self._run(load_only)

    def close(self) -> None:
        try:
            self._run(self.manager.close)
        finally:
            self.service.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def open_client(model: str, load: dict[str, Any]) -> tuple[ConversationClient, str]:
    """The server's client when one answers (and can read the model), else the in-process one; and the model
    name to use with it (a path the server reads is sent absolute)."""
    if remote.available():
        served = remote.load(model, load)
        if served is not None:
            return RemoteConversations(), served
    client = LocalConversations()
    try:
        client.load(model, load)  # an unknown or damaged model fails now, not at the first message
    except BaseException:
        client.close()
        raise
    return client, model
