"""One turn of a stored conversation: append the new messages, fit the context, answer, store the answer.

Every way in (the native /api/conversations routes, the Responses API, the REPL) runs its turns here, and calls
the model only through the model manager's `chat` (and `embed`, for selective with embeddings).

The order of writes is what makes a killed server harmless:
1. the context plan is made first (a summary step writes its summary on its own); a prompt that cannot fit
   is refused before anything is written;
2. one transaction stores the new messages and an empty answer marked `in_progress`;
3. while the answer streams, its text is rewritten every FLUSH_SECONDS or FLUSH_CHUNKS chunks, one small
   transaction each, still `in_progress`;
4. the end writes the whole answer as `completed` with its context report. A client that goes away, or an
   error, leaves the text so far marked `incomplete`; an answer with no text at all is removed, so the
   conversation ends at the question (answered by the next turn without a new message).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ember.conversations.context import ContextPlan, ContextPlanner, Entry
from ember.conversations.db import new_id
from ember.conversations.records import Conversation, ConversationBusyError, StoredMessage
from ember.conversations.retrieval import Ranker
from ember.conversations.sources import Sources, collections_of, gather_sources
from ember.conversations.store import ConversationStore, NewMessage
from ember.conversations.summarize import Summarizer
from ember.conversations.tokens import CounterCache, EstimatedCounter, PromptCounter, Window, window_for
from ember.errors import EngineError, InvalidRequestError
from ember.store.resolve import ModelSource, resolve_model
from ember.types import ChatRequest, ChatResponse, Message

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.25
FLUSH_CHUNKS = 32
ACTIVE = "active"  # TurnRequest.parent_id: attach to the conversation's active leaf


@dataclass
class TurnRequest:
    conversation_id: str
    new_messages: list[NewMessage] = field(default_factory=list)  # appended before the answer (may be none)
    parent_id: str | None = ACTIVE  # where they attach; None: a new root
    model: str | None = None  # default: the conversation's
    options: dict[str, Any] = field(default_factory=dict)  # over the conversation's own
    format: Any = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    system: str | None = None  # with override_system: this turn's system prompt instead of the conversation's
    override_system: bool = False
    strategy: str | None = None  # default: the conversation's
    persist: bool = True  # False: nothing is written (the Responses API's store=false)
    priority: str | int | None = None
    timeout: float | None = None
    keep_alive: str | float | None = None
    return_prompt: bool = False
    answer_id: str | None = None  # the answer's message id, when the caller needs it before the answer ends
    continue_answer: bool = False  # parent_id names an assistant message: write more of it, in place
    report_prefill: bool = False  # stream chunks with `prefill` while a long prompt is read
    conversation: Conversation | None = None  # with persist False: a conversation that is not in the store


@dataclass
class TurnResult:
    """The end of a turn, after the last chunk."""

    conversation: Conversation
    answer: StoredMessage  # as stored (or as it would be, when not persisted)
    added: list[StoredMessage]  # the new messages before it
    final: ChatResponse  # the model's final chunk: timings, done_reason
    context: dict[str, Any]  # {used, prompt, limit, dropped, summarized, strategy, ...}
    prompt_tokens: list[int] | None = None  # with return_prompt: the tokens the model was given


class ConversationService:
    def __init__(
        self,
        store: ConversationStore,
        manager: Any,
        *,
        counters: CounterCache | None = None,
        default_model: str = "smollm2",
    ) -> None:
        self.store = store
        self.manager = manager
        self.counters = counters or CounterCache()
        self.default_model = default_model
        self._busy: set[str] = set()

    def close(self) -> None:
        self.counters.close()

    async def source(self, model: str) -> tuple[ModelSource, PromptCounter | EstimatedCounter]:
        source = await asyncio.to_thread(resolve_model, model)
        return source, await asyncio.to_thread(self.counters.get, source)

    def window(self, source: ModelSource, options: dict[str, Any]) -> Window:
        return window_for(source, getattr(self.manager, "default_options", {}), options)

    async def turn(self, request: TurnRequest) -> AsyncIterator[ChatResponse | TurnResult]:
        """Chunks of the answer as they come, then one TurnResult."""
        if request.conversation_id in self._busy:
            raise ConversationBusyError(
                f"conversation {request.conversation_id} is answering another message; wait for it to finish"
            )
        self._busy.add(request.conversation_id)
        events = self._turn(request)
        try:
            async for event in events:
                yield event
        finally:
            # Closed here, not left to the garbage collector, so that a partial answer is written at once.
            await events.aclose()
            self._busy.discard(request.conversation_id)

    async def _turn(self, request: TurnRequest) -> AsyncIterator[ChatResponse | TurnResult]:
        conversation, path = await asyncio.to_thread(self._branch, request)
        continued = path[-1] if request.continue_answer and path else None
        if request.continue_answer and (continued is None or continued.role != "assistant" or request.new_messages):
            raise InvalidRequestError("only an assistant's answer can be continued, and with no new message")
        if continued is not None:
            path = path[:-1]  # the answer itself is the prompt's open end, not a finished turn
        parent_id = path[-1].id if path else None
        if continued is None and not request.new_messages and (not path or path[-1].role == "assistant"):
            raise InvalidRequestError(
                "nothing to answer: send a message" + (", or regenerate the last answer" if path else "")
            )
        model = request.model or conversation.model or self.default_model
        source, counter = await self.source(model)
        options = {**conversation.options, **request.options}
        window = self.window(source, options)
        new = [replace(message, id=message.id or new_id("msg")) for message in request.new_messages]
        sources = await self._sources(conversation, [*path, *new], model, source, counter, window, request)
        if sources is not None:
            base = request.system if request.override_system else conversation.system
            base = source.system if base is None else base
            request = replace(request, system=f"{base}\n\n{sources.system_block()}" if base else sources.system_block())
            request.override_system = True
        entries, counted = await asyncio.to_thread(_entries, counter, path + ([continued] if continued else []), new)
        plan = await self._plan(request, conversation, source, counter, window, options, entries)

        answer_id = request.answer_id or new_id("msg")
        answer_info: dict[str, Any] = {"model": model}
        if sources is not None:
            answer_info.update(sources=sources.items, documents=sources.info())
        answer = NewMessage(role="assistant", status="in_progress", id=answer_id, info=answer_info)
        if continued is not None:
            stored = [continued]
            if request.persist:
                await asyncio.to_thread(
                    self.store.write_answer, continued.id, content=continued.content, status="in_progress"
                )
        elif request.persist:
            stored = await asyncio.to_thread(
                self.store.append,
                conversation.id,
                parent_id,
                [*new, answer],
                context_state=plan.state,
                token_counts=counted,
            )
        else:
            stored = [_unsaved(conversation.id, message, parent_id) for message in [*new, answer]]
        chat = ChatRequest(
            model=model,
            messages=plan.messages,
            options=options,
            format=request.format,
            tools=request.tools,
            tool_choice=request.tool_choice,
            keep_alive=request.keep_alive,
            stream=True,
            continue_final=continued is not None,
            report_prefill=request.report_prefill,
        )
        writer = _AnswerWriter(self.store if request.persist else None, stored[-1])
        if continued is not None:
            writer.parts.append(continued.content)
            writer.answer.info = {**continued.info, **answer_info}
        try:
            async for chunk in self.manager.chat(chat, priority=request.priority, timeout=request.timeout):
                writer.take(chunk)
                yield chunk
                if writer.due():
                    await asyncio.to_thread(writer.write, "in_progress", None)
        finally:
            if writer.final is None:
                writer.abandon()
        final = writer.final
        if final is None:
            raise EngineError("the answer ended without its final chunk")
        prompt = final.prompt_eval_count + final.prompt_cached_count
        if prompt != plan.prompt_tokens:
            log.warning(
                "conversation %s: %d prompt tokens counted, %d decoded", conversation.id, plan.prompt_tokens, prompt
            )
            plan.prompt_tokens = prompt
        report = plan.report(prompt + final.eval_count, conversation.settings)
        answer_message = await asyncio.to_thread(writer.finish, report)
        prompt_tokens = None
        if request.return_prompt:
            prompt_tokens = await asyncio.to_thread(
                counter.prompt_tokens, plan.messages, tools=request.tools, tool_choice=request.tool_choice
            )
        if request.persist:
            conversation = await asyncio.to_thread(self.store.get, conversation.id)
        yield TurnResult(conversation, answer_message, stored[:-1], final, report, prompt_tokens)

    async def _sources(
        self,
        conversation: Conversation,
        messages: Sequence[StoredMessage | NewMessage],
        model: str,
        source: ModelSource,
        counter: PromptCounter | EstimatedCounter,
        window: Window,
        request: TurnRequest,
    ) -> Sources | None:
        """The conversation's documents for this turn (see sources.py), asked about its last user message."""
        question = next((message.content for message in reversed(messages) if message.role == "user"), "")
        if not request.persist and request.conversation is not None:
            return None  # a conversation outside the store has no documents

        def count_text(text: str) -> int:
            return counter.message_tokens(Message(role="user", content=text))

        return await gather_sources(
            self.store.documents,
            conversation.id,
            collections_of(conversation.metadata),
            question,
            room=window.budget,
            count_text=count_text,
            embed=getattr(self.manager, "embed", None),
            embedding_model=conversation.settings.embedding_model or model,
            timeout=request.timeout,
        )

    def _branch(self, request: TurnRequest) -> tuple[Conversation, list[StoredMessage]]:
        """The conversation and the branch the turn continues (its active one, or up to a given message)."""
        if request.conversation is not None and not request.persist:
            conversation = request.conversation
            parent = request.parent_id if request.parent_id != ACTIVE else conversation.active_leaf
            return conversation, [] if parent is None else self.store.branch(conversation.id, parent)
        if request.parent_id == ACTIVE:
            return self.store.conversation_and_path(request.conversation_id)
        if request.parent_id is None:
            return self.store.get(request.conversation_id), []
        return self.store.conversation_and_path(request.conversation_id, request.parent_id)

    async def _plan(
        self,
        request: TurnRequest,
        conversation: Conversation,
        source: ModelSource,
        counter: PromptCounter | EstimatedCounter,
        window: Window,
        options: dict[str, Any],
        entries: list[Entry],
    ) -> ContextPlan:
        strategy = request.strategy or conversation.strategy
        planner = self._planner(
            conversation,
            strategy,
            source,
            counter,
            window,
            system=request.system if request.override_system else conversation.system,
            tools=request.tools,
            tool_choice=request.tool_choice,
            timeout=request.timeout,
        )
        if strategy == "summarize":
            model = conversation.settings.summary_model or request.model or conversation.model or self.default_model
            planner.summarize = await self._summarizer(model, options, planner.summary_room, request.timeout)
        return await planner.plan(entries)

    def _planner(
        self,
        conversation: Conversation,
        strategy: str,
        source: ModelSource,
        counter: PromptCounter | EstimatedCounter,
        window: Window,
        *,
        system: str | None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        timeout: float | None = None,
    ) -> ContextPlanner:
        async def count(messages: list[Message]) -> int:
            return await asyncio.to_thread(counter.prompt_length, messages, tools=tools, tool_choice=tool_choice)

        async def store_summary(text: str, info: dict[str, Any]) -> str:
            return (await asyncio.to_thread(self.store.add_summary, conversation.id, text, info)).id

        async def load_summary(summary_id: str) -> StoredMessage | None:
            return await asyncio.to_thread(self.store.summary, conversation.id, summary_id)

        planner = ContextPlanner(
            strategy=strategy,
            settings=conversation.settings,
            window=window,
            count=count,
            system=system,
            default_system=source.system,
            state=conversation.context_state if strategy == conversation.strategy else {},
            store_summary=store_summary,
            load_summary=load_summary,
        )
        if strategy == "selective":
            planner.rank = Ranker(
                self.store,
                embed=getattr(self.manager, "embed", None),
                embedding_model=conversation.settings.embedding_model,
                timeout=timeout,
            )
        return planner

    async def _summarizer(
        self, model: str, options: dict[str, Any], max_tokens: int, timeout: float | None
    ) -> Summarizer:
        source, counter = await self.source(model)
        window = self.window(source, {**options, "num_predict": max_tokens})

        async def count(messages: list[Message]) -> int:
            return await asyncio.to_thread(counter.prompt_length, messages)

        return Summarizer(self.manager.chat, model, options=options, count=count, budget=window.budget, timeout=timeout)

    async def context(self, conversation_id: str) -> dict[str, Any]:
        """The context meter as the conversation stands: what its next prompt would hold without a new message.
        Nothing is written and no summary is made (a summarize step due at the next turn is not taken here).
        The conversation's documents count as its last question would get them."""
        conversation, path = await asyncio.to_thread(self.store.conversation_and_path, conversation_id)
        model = conversation.model or self.default_model
        source, counter = await self.source(model)
        window = self.window(source, conversation.options)
        system = conversation.system
        sources = await self._sources(conversation, path, model, source, counter, window, TurnRequest(conversation_id))
        if sources is not None:
            base = source.system if system is None else system
            system = f"{base}\n\n{sources.system_block()}" if base else sources.system_block()
        planner = self._planner(conversation, conversation.strategy, source, counter, window, system=system)
        entries, _ = await asyncio.to_thread(_entries, counter, path, [])
        if not entries:
            used = await planner.count([Message(role="system", content=system)]) if system else 0
            return {
                "used": used,
                "prompt": used,
                "limit": window.num_ctx,
                "budget": window.budget,
                "dropped": 0,
                "summarized": 0,
                "strategy": conversation.strategy,
                "messages": 0,
            }
        try:
            plan = await planner.plan(entries)
        except InvalidRequestError as error:
            return {
                "used": None,
                "limit": window.num_ctx,
                "budget": window.budget,
                "strategy": conversation.strategy,
                "error": str(error),
            }
        return plan.report(plan.prompt_tokens, conversation.settings)


def _entries(
    counter: PromptCounter | EstimatedCounter, path: Sequence[StoredMessage], new: Sequence[NewMessage]
) -> tuple[list[Entry], list[tuple[str, int, str]]]:
    """The path and the new messages as plan entries, with their token estimates (cached per message and
    tokenizer; the ones measured now are returned to be stored)."""
    entries, counted = [], []
    for message in path:
        native = message.to_native()
        tokens = message.token_count if message.token_model == counter.key else None
        if tokens is None:
            tokens = counter.message_tokens(native)
            counted.append((message.id, tokens, counter.key))
        entries.append(Entry(id=message.id, message=native, tokens=tokens, pinned=message.pinned))
    for message in new:
        assert message.id is not None
        native = _native(message)
        tokens = counter.message_tokens(native)
        counted.append((message.id, tokens, counter.key))
        entries.append(Entry(id=message.id, message=native, tokens=tokens, pinned=message.pinned, new=True))
    return entries, counted


def _native(message: NewMessage) -> Message:
    return _unsaved("", message, None).to_native()


def _unsaved(conversation_id: str, message: NewMessage, parent_id: str | None) -> StoredMessage:
    return message.stored(
        id=message.id or new_id("msg"), conversation_id=conversation_id, parent_id=parent_id, seq=-1, stamp=time.time()
    )


class _AnswerWriter:
    """Collects the streamed answer and writes it to the store as it grows (see the module's docstring)."""

    def __init__(self, store: ConversationStore | None, answer: StoredMessage) -> None:
        self.store = store
        self.answer = answer
        self.parts: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.final: ChatResponse | None = None
        self._unwritten = 0
        self._last_write = time.monotonic()
        # A write of the text so far may still be running in a worker thread when the stream is abandoned; the
        # lock makes the abandoning write come after it, so the answer ends marked incomplete.
        self._lock = threading.RLock()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take(self, chunk: ChatResponse) -> None:
        if chunk.message.content:
            self.parts.append(chunk.message.content)
            self._unwritten += 1
        for call in chunk.message.tool_calls or ():
            # Ids fixed now, from the answer's own id, so later requests (tool results, the Conversations API's
            # items) can name the call.
            data = call.model_dump(exclude_none=True)
            data.setdefault("id", f"call_{self.answer.id.removeprefix('msg_')}_{len(self.calls)}")
            self.calls.append(data)
            self._unwritten += 1
        if chunk.done:
            self.final = chunk

    def due(self) -> bool:
        """Time to write the text so far: FLUSH_CHUNKS chunks, or FLUSH_SECONDS since the last write."""
        if self.store is None or self.final is not None or not self._unwritten:
            return False
        return self._unwritten >= FLUSH_CHUNKS or time.monotonic() - self._last_write >= FLUSH_SECONDS

    def write(self, status: str, info: dict[str, Any] | None) -> None:
        if self.store is None:
            return
        with self._lock:
            self.store.write_answer(
                self.answer.id, content=self.text, status=status, tool_calls=self.calls or None, info=info
            )
            self._unwritten = 0
            self._last_write = time.monotonic()

    def abandon(self) -> None:
        """The stream ended without its final chunk (client gone, cancelled, failed). Written at once, without
        awaiting: a cancelled task may not get to run another await."""
        if self.store is None:
            return
        try:
            with self._lock:
                if self.text or self.calls:
                    self.write("incomplete", {**self.answer.info, "done_reason": "cancelled"})
                else:
                    self.store.remove_message(self.answer.conversation_id, self.answer.id)
        except Exception:
            log.exception("could not keep the partial answer %s", self.answer.id)

    def finish(self, report: dict[str, Any]) -> StoredMessage:
        final = self.final
        assert final is not None
        info = {
            **self.answer.info,
            "done_reason": final.done_reason or "stop",
            "context": report,
            "prompt_eval_count": final.prompt_eval_count,
            "prompt_cached_count": final.prompt_cached_count,
            "eval_count": final.eval_count,
            "eval_duration": final.eval_duration,
            "prompt_eval_duration": final.prompt_eval_duration,
            "total_duration": final.total_duration,
        }
        self.write("completed", info)
        self.answer.content = self.text
        self.answer.status = "completed"
        self.answer.tool_calls = self.calls or None
        self.answer.info = info
        return self.answer
