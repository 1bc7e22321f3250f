"""Exact token counts of a conversation's prompt, as the runner will render it.

The counter loads the model's vocabulary only (no weights: milliseconds, a few MB) and renders through the same
PromptBuilder and ToolPlan steps as `LoadedModel.start_chat`: seed messages and the model's default system prompt
put in place, tools offered the same way, the same template, the same BOS handling. So `context.used` is the
number the engine will see (a test checks it against the runner's own prompt count).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.engine.llamacpp import LlamaModel
from ember.errors import InvalidRequestError
from ember.options import LOAD_OPTION_NAMES, SAMPLING_OPTION_NAMES, LoadOptions, load_options, sampling_options
from ember.prompt import PromptBuilder, prompt_limit
from ember.store.resolve import ModelSource
from ember.tools import ToolPlan
from ember.types import Message

_PROBE = Message(role="system", content="x")  # a fixed first message, so a template adds no default of its own


class PromptCounter:
    """Counts and renders chat prompts for one model file. Safe to share between threads."""

    def __init__(self, source: ModelSource) -> None:
        self.key = source.digest or str(source.path)  # names the tokenizer in cached per-message counts
        self._vocab = LlamaModel.vocab_only(source.path, load_options({}))
        try:
            self.prompts = PromptBuilder(
                self._vocab, template=source.template, system=source.system, messages=source.messages
            )
        except BaseException:
            self._vocab.close()
            raise
        self.default_system = source.system
        self._lock = threading.Lock()

    def prompt_tokens(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
    ) -> list[int]:
        """The tokens the runner will decode for a chat request with these messages."""
        with self._lock:
            conversation = self.prompts.chat_messages(list(messages), None)
            plan = ToolPlan.for_request(tools, tool_choice, self.prompts.template_source)
            text = self.prompts.render_chat(plan.conversation(conversation), tools=plan.template_tools())
            return self.prompts.tokenize_prompt(text)

    def prompt_length(
        self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None
    ) -> int:
        return len(self.prompt_tokens(messages, tools=tools, tool_choice=tool_choice))

    def message_tokens(self, message: Message) -> int:
        """What one message adds to a prompt, its framing included: the difference it makes after a fixed
        system message. Exact for templates that render each message alone (ChatML and most others); the
        strategies use it only to choose what to keep, and count the chosen prompt exactly."""
        with self._lock:
            template = self.prompts.template
            try:
                with_it = template.render(
                    [_PROBE.template_view(), message.template_view()], add_generation_prompt=False
                )
                without = template.render([_PROBE.template_view()], add_generation_prompt=False)
                return max(1, len(self._tokens(with_it)) - len(self._tokens(without)))
            except Exception:  # a template that refuses this order of roles: the content and some framing
                return len(self._tokens(message.content)) + 8

    def _tokens(self, text: str) -> list[int]:
        return self._vocab.tokenize(text, add_special=False, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._lock:
            return self._vocab.detokenize(list(tokens))

    def close(self) -> None:
        with self._lock:
            self._vocab.close()


class EstimatedCounter:
    """Token counts of an upstream model's prompts, estimated: its tokenizer and template are on its server.

    One token per 3 bytes of UTF-8 (English text runs at about 4 with Llama-3's and Qwen's tokenizers, so this
    overestimates, and a context strategy drops a little early rather than sending a prompt the server refuses)
    and 8 tokens of framing per message, as chat templates add role markers.
    """

    BYTES_PER_TOKEN = 3
    FRAMING = 8

    def __init__(self, source: ModelSource) -> None:
        self.key = f"estimate:{source.digest or source.name}"
        self.default_system = source.system
        self.source = source

    def _text_tokens(self, text: str) -> int:
        return -(-len(text.encode()) // self.BYTES_PER_TOKEN)

    def message_tokens(self, message: Message) -> int:
        calls = json.dumps([c.model_dump() for c in message.tool_calls]) if message.tool_calls else ""
        return self._text_tokens(message.content + calls) + self.FRAMING

    def prompt_length(
        self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None
    ) -> int:
        seeds = [Message.model_validate(dict(m)) for m in self.source.messages]
        conversation = [*seeds, *messages]
        if self.source.system and not any(m.role == "system" for m in conversation):
            conversation.insert(0, Message(role="system", content=self.source.system))
        total = sum(self.message_tokens(m) for m in conversation) + self.FRAMING  # the generation prompt
        return total + (self._text_tokens(json.dumps(list(tools))) if tools else 0)

    def prompt_tokens(self, messages: Sequence[Message], **_: Any) -> list[int]:
        raise InvalidRequestError(
            f"{self.source.name} is an upstream model: its prompt tokens are its server's (return_prompt needs a "
            "local model)"
        )

    def close(self) -> None:
        pass


class CounterCache:
    """A few PromptCounters, one per model file, the least recently used closed first."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._counters: OrderedDict[tuple[Any, ...], PromptCounter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: ModelSource) -> PromptCounter | EstimatedCounter:
        if source.upstream is not None:
            return EstimatedCounter(source)
        key = (
            str(source.path),
            source.template,
            source.system,
            tuple(tuple(sorted(m.items())) for m in source.messages),
        )
        with self._lock:
            counter = self._counters.get(key)
            if counter is not None:
                self._counters.move_to_end(key)
                return counter
        counter = PromptCounter(source)  # outside the lock: loading a vocabulary takes a moment
        with self._lock:
            existing = self._counters.get(key)
            if existing is not None:
                counter.close()
                return existing
            self._counters[key] = counter
            while len(self._counters) > self.size:
                _, oldest = self._counters.popitem(last=False)
                oldest.close()
        return counter

    def close(self) -> None:
        with self._lock:
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()


@dataclass(frozen=True)
class Window:
    """The context a turn has: num_ctx, and how much of it the prompt may take (the rest is the answer's)."""

    num_ctx: int
    budget: int
    load: LoadOptions


def window_for(source: ModelSource, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> Window:
    """num_ctx as the model manager will load it (its defaults, the model's parameters, then the request's),
    and the room kept for the answer as ember's truncation keeps it (num_predict, else a quarter, at most half)."""
    layers = [dict(defaults), dict(source.parameters), dict(options)]
    load = load_options(*({k: v for k, v in layer.items() if k in LOAD_OPTION_NAMES} for layer in layers))
    sampling = sampling_options(*({k: v for k, v in layer.items() if k in SAMPLING_OPTION_NAMES} for layer in layers))
    return Window(num_ctx=load.num_ctx, budget=prompt_limit(load.num_ctx, sampling), load=load)
