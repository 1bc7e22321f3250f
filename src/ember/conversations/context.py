"""Context strategies: which stored messages go into the next prompt so that it fits num_ctx.

The prompt may take `budget` tokens (num_ctx less the room kept for the answer). While the whole active path
fits, every strategy sends all of it. Past that:

- `sliding` drops the oldest turns, keeping the system prompt, pinned messages and the last `keep_last`
  messages. It drops in one large step (down to SLIDE_TO of the budget) and remembers where the window starts,
  so the next turns render the same prefix and the engine's prefix cache keeps working until the next step.
- `summarize` folds the oldest turns into a running summary written by the model (or `summary_model`), kept as
  a summary message and sent inside the system message. It folds when the prompt reaches SUMMARIZE_AT of the
  budget, down to SUMMARIZE_TO: large, rare steps, so the prefix stays stable between them.
- `selective` keeps pins and the last messages, then fills up to SELECT_TO of the budget with the older
  messages most relevant to the new one (BM25 from the FTS5 index, or embeddings), then with the most recent
  of the rest, all in their original order.
- `none` refuses with the numbers.

Choices are made with cached per-message estimates; the prompt finally chosen is always counted exactly (the
same rendering as the runner's), and that count is what the turn reports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.conversations.records import ContextSettings, StoredMessage
from ember.conversations.tokens import Window
from ember.errors import InvalidRequestError
from ember.types import Message

SLIDE_TO = 0.75
SUMMARIZE_AT = 0.9
SUMMARIZE_TO = 0.5
SELECT_TO = 0.75
SUMMARY_HEADING = "Summary of the conversation so far:"


class ConversationOverflowError(InvalidRequestError):
    """The next prompt cannot fit num_ctx with room for the answer (strategy none, or not even the last turn)."""

    def __init__(self, message: str, prompt_tokens: int, window: Window) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.num_ctx = window.num_ctx
        self.budget = window.budget


@dataclass
class Entry:
    """A message that may go into the prompt: a stored one, or one of this turn's new messages (whose id is
    given before they are stored, so that a plan can name them)."""

    id: str
    message: Message
    tokens: int  # estimate: what it adds to a prompt
    pinned: bool = False
    new: bool = False


@dataclass
class ContextPlan:
    messages: list[Message]  # what the model gets, system message first when there is one
    prompt_tokens: int  # exact
    window: Window
    strategy: str
    included: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    summarized: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # the conversation's context_state after this plan
    summary_id: str | None = None

    def report(self, used: int, settings: ContextSettings) -> dict[str, Any]:
        """The `context` object of an answer: `used` counts the prompt and the answer."""
        report: dict[str, Any] = {
            "used": used,
            "prompt": self.prompt_tokens,
            "limit": self.window.num_ctx,
            "budget": self.window.budget,
            "dropped": len(self.dropped),
            "summarized": len(self.summarized),
            "strategy": self.strategy,
            "messages": len(self.included),
        }
        if used >= settings.warn_at * self.window.num_ctx:
            what = {
                "sliding": "the oldest turns will be dropped",
                "summarize": "the oldest turns will be summarized",
                "selective": "only pinned, recent and relevant messages will be kept",
                "none": "the conversation will be refused once it is full",
            }[self.strategy]
            report["warning"] = (
                f"the context is {100 * used / self.window.num_ctx:.0f}% full ({used} of {self.window.num_ctx} "
                f"tokens); {what}"
            )
        return report


Count = Callable[[list[Message]], Awaitable[int]]
Summarize = Callable[[str | None, list[Message], int], Awaitable[str]]
Rank = Callable[[list[Entry], str], Awaitable[dict[str, float]]]
StoreSummary = Callable[[str, dict[str, Any]], Awaitable[str]]
LoadSummary = Callable[[str], Awaitable[StoredMessage | None]]


@dataclass
class ContextPlanner:
    strategy: str
    settings: ContextSettings
    window: Window
    count: Count
    system: str | None  # the conversation's system prompt (or a request's instructions)
    default_system: str | None = None  # the model's own (a Modelfile's SYSTEM): kept when a summary joins
    state: dict[str, Any] = field(default_factory=dict)
    summarize: Summarize | None = None
    store_summary: StoreSummary | None = None
    load_summary: LoadSummary | None = None
    rank: Rank | None = None

    async def plan(self, entries: Sequence[Entry]) -> ContextPlan:
        entries = list(entries)
        if self.strategy == "sliding":
            return await self._sliding(entries)
        if self.strategy == "summarize":
            return await self._summarize(entries)
        if self.strategy == "selective":
            return await self._selective(entries)
        return await self._none(entries)

    # --- pieces --------------------------------------------------------------------------------------

    def _head(self, summary: str | None = None) -> list[Message]:
        if summary:
            base = self.system or self.default_system
            text = f"{base}\n\n{SUMMARY_HEADING}\n{summary}" if base else f"{SUMMARY_HEADING}\n{summary}"
            return [Message(role="system", content=text)]
        return [Message(role="system", content=self.system)] if self.system else []

    def _protected(self, entries: list[Entry]) -> int:
        """Index of the first message always kept: the last keep_last messages, and this turn's new ones."""
        new = next((i for i, entry in enumerate(entries) if entry.new), len(entries))
        return max(0, min(new, len(entries) - self.settings.keep_last))

    def _last_turn(self, entries: list[Entry]) -> int:
        """Index where the last turn starts: the new messages, else the last user message."""
        new = next((i for i, entry in enumerate(entries) if entry.new), None)
        if new is not None:
            return new
        users = [i for i, entry in enumerate(entries) if entry.message.role == "user"]
        return users[-1] if users else max(0, len(entries) - 1)

    def _plan(self, head: list[Message], chosen: list[Entry], entries: list[Entry], tokens: int) -> ContextPlan:
        kept = {id(entry) for entry in chosen}
        return ContextPlan(
            messages=head + [entry.message for entry in chosen],
            prompt_tokens=tokens,
            window=self.window,
            strategy=self.strategy,
            included=[entry.id for entry in chosen],
            dropped=[entry.id for entry in entries if id(entry) not in kept],
            state=dict(self.state),
        )

    def _overflow(self, tokens: int, *, last_turn: bool) -> ConversationOverflowError:
        window = self.window
        if last_turn:
            message = (
                f"the newest message needs {tokens} prompt tokens with the system prompt and pins, but only "
                f"{window.budget} of num_ctx {window.num_ctx} are left for the prompt (the rest is kept for the "
                "answer); shorten the message, unpin messages, raise num_ctx or lower num_predict"
            )
        else:
            message = (
                f"the conversation needs {tokens} prompt tokens but only {window.budget} of num_ctx "
                f"{window.num_ctx} are left for the prompt (the rest is kept for the answer); use the context "
                'strategy sliding, summarize or selective (truncation "auto" in the Responses API), raise '
                "num_ctx, or lower num_predict"
            )
        return ConversationOverflowError(message, tokens, window)

    async def _counted(self, head: list[Message], chosen: list[Entry]) -> int:
        return await self.count(head + [entry.message for entry in chosen])

    # --- none ----------------------------------------------------------------------------------------

    async def _none(self, entries: list[Entry]) -> ContextPlan:
        head = self._head()
        tokens = await self._counted(head, entries)
        if tokens > self.window.budget:
            raise self._overflow(tokens, last_turn=False)
        return self._plan(head, entries, entries, tokens)

    # --- sliding -------------------------------------------------------------------------------------

    def _window(self, entries: list[Entry], start: int) -> list[Entry]:
        return [entry for i, entry in enumerate(entries) if i >= start or entry.pinned]

    async def _sliding(self, entries: list[Entry]) -> ContextPlan:
        head = self._head()
        start = _index_of(entries, self.state.get("window_start"))
        chosen = self._window(entries, start)
        tokens = await self._counted(head, chosen)
        if tokens > self.window.budget:
            start, chosen, tokens = await self._slide(head, entries, start, tokens, int(SLIDE_TO * self.window.budget))
        plan = self._plan(head, chosen, entries, tokens)
        plan.state = {"window_start": entries[start].id} if 0 < start < len(entries) else {}
        return plan

    async def _slide(
        self, head: list[Message], entries: list[Entry], start: int, tokens: int, target: int
    ) -> tuple[int, list[Entry], int]:
        """Move the window's start forward, a turn at a time, until the estimate is under `target`; then on
        until the exact count fits the budget. Returns (start, kept entries, exact tokens)."""
        protected = max(start, self._protected(entries))
        estimate = tokens
        while start < protected and estimate > target:
            following = _next_turn(entries, start, protected)
            estimate -= sum(entry.tokens for entry in entries[start:following] if not entry.pinned)
            start = following
        chosen = self._window(entries, start)
        tokens = await self._counted(head, chosen)
        last_turn = self._last_turn(entries)
        while tokens > self.window.budget and start < last_turn:
            start = _next_turn(entries, start, last_turn)
            chosen = self._window(entries, start)
            tokens = await self._counted(head, chosen)
        if tokens > self.window.budget:
            raise self._overflow(tokens, last_turn=True)
        return start, chosen, tokens

    # --- summarize -----------------------------------------------------------------------------------

    async def _summarize(self, entries: list[Entry]) -> ContextPlan:
        summary = await self._current_summary(entries)
        through = _after(entries, summary.info.get("through")) if summary else 0  # the first index not covered
        summary_text = summary.content if summary else None
        head = self._head(summary_text)
        chosen = self._window(entries, through)
        tokens = await self._counted(head, chosen)
        if tokens > SUMMARIZE_AT * self.window.budget and self.summarize is not None:
            folded_until = self._fold_point(entries, through, tokens)
            folded = [entry for entry in entries[through:folded_until] if not entry.pinned]
            if folded:
                summary_text, summary = await self._fold(summary, folded, entries[folded_until - 1])
                through = folded_until
                head = self._head(summary_text)
                chosen = self._window(entries, through)
                tokens = await self._counted(head, chosen)
        start = through
        if tokens > self.window.budget:  # the summary and the rest still do not fit: slide past what is left
            start, chosen, tokens = await self._slide(head, entries, through, tokens, self.window.budget)
        plan = self._plan(head, chosen, entries, tokens)
        covered = set(summary.info.get("covers", ())) if summary else set()
        plan.summarized = [entry_id for entry_id in plan.dropped if entry_id in covered]
        plan.dropped = [entry_id for entry_id in plan.dropped if entry_id not in covered]
        plan.summary_id = summary.id if summary else None
        plan.state = {"summary_id": summary.id} if summary else {}
        if start > through:
            plan.state["window_start"] = entries[start].id
        return plan

    async def _current_summary(self, entries: list[Entry]) -> StoredMessage | None:
        """The summary in the state, if what it covers is still the start of this branch."""
        summary_id = self.state.get("summary_id")
        if not summary_id or self.load_summary is None:
            return None
        summary = await self.load_summary(summary_id)
        if summary is None or _after(entries, summary.info.get("through")) == 0:
            return None
        return summary

    def _fold_point(self, entries: list[Entry], through: int, tokens: int) -> int:
        """Where the fold ends (exclusive): whole turns from `through`, until what is left is under SUMMARIZE_TO
        of the budget (the new summary's room counted in), never into the protected last messages."""
        protected = max(through, self._protected(entries))
        target = SUMMARIZE_TO * self.window.budget - self.summary_room
        estimate, end = tokens, through
        while end < protected and estimate > target:
            following = _next_turn(entries, end, protected)
            estimate -= sum(entry.tokens for entry in entries[end:following] if not entry.pinned)
            end = following
        return end

    @property
    def summary_room(self) -> int:
        """The most tokens a summary may take (the summarizer's num_predict)."""
        return max(32, self.window.budget // 8)

    async def _fold(
        self, previous: StoredMessage | None, folded: list[Entry], last: Entry
    ) -> tuple[str, StoredMessage]:
        assert self.summarize is not None and self.store_summary is not None and self.load_summary is not None
        text = await self.summarize(
            previous.content if previous else None, [e.message for e in folded], self.summary_room
        )
        covers = [*(previous.info.get("covers", ()) if previous else ()), *(entry.id for entry in folded)]
        summary_id = await self.store_summary(text, {"through": last.id, "covers": covers})
        summary = await self.load_summary(summary_id)
        assert summary is not None
        return text, summary

    # --- selective -----------------------------------------------------------------------------------

    async def _selective(self, entries: list[Entry]) -> ContextPlan:
        head = self._head()
        tokens = await self._counted(head, entries)
        if tokens <= self.window.budget:
            return self._plan(head, entries, entries, tokens)
        protected = self._protected(entries)
        base = [entry for i, entry in enumerate(entries) if i >= protected or entry.pinned]
        base_tokens = await self._counted(head, base)
        if base_tokens > self.window.budget:  # not even the last messages: keep only pins and the last turn
            protected = self._last_turn(entries)
            base = [entry for i, entry in enumerate(entries) if i >= protected or entry.pinned]
            base_tokens = await self._counted(head, base)
            if base_tokens > self.window.budget:
                raise self._overflow(base_tokens, last_turn=True)
        others = [entry for entry in entries[:protected] if not entry.pinned]
        query = " ".join(entry.message.content for entry in entries[self._last_turn(entries) :])
        scores = await self.rank(others, query) if self.rank is not None and others else {}
        relevant = sorted((entry for entry in others if scores.get(entry.id, 0) > 0), key=lambda e: -scores[e.id])
        # The room the relevant messages leave goes to the most recent others, so little is left unused.
        recent = [entry for entry in reversed(others) if scores.get(entry.id, 0) <= 0]
        ranked = relevant + recent
        picked: list[Entry] = []
        estimate, target = base_tokens, SELECT_TO * self.window.budget
        for entry in ranked:
            if estimate + entry.tokens <= target:
                picked.append(entry)
                estimate += entry.tokens
        keep = {id(entry) for entry in base + picked}
        chosen = [entry for entry in entries if id(entry) in keep]
        tokens = await self._counted(head, chosen)
        while tokens > self.window.budget and picked:  # estimates were low: give up the last picked
            dropped = picked.pop()
            chosen = [entry for entry in chosen if entry is not dropped]
            tokens = await self._counted(head, chosen)
        plan = self._plan(head, chosen, entries, tokens)
        plan.state = {}
        return plan


def _index_of(entries: Sequence[Entry], message_id: Any) -> int:
    """The index of the entry with that id; 0 (the start) when it is not on this branch."""
    return next((index for index, entry in enumerate(entries) if message_id and entry.id == message_id), 0)


def _after(entries: Sequence[Entry], message_id: Any) -> int:
    """The index just after the entry with that id; 0 when it is not on this branch."""
    found = next((index for index, entry in enumerate(entries) if message_id and entry.id == message_id), None)
    return 0 if found is None else found + 1


def _next_turn(entries: Sequence[Entry], start: int, limit: int) -> int:
    """The next index after `start` where a turn begins (a user message), at most `limit` (but past `start`)."""
    for index in range(start + 1, limit):
        if entries[index].message.role == "user":
            return index
    return max(limit, start + 1)
