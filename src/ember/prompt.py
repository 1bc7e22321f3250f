"""Building the token sequence a request sends to the engine: templates, system prompts, truncation."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.chat_template import CHATML_TEMPLATE, ChatTemplate
from ember.engine.llamacpp import JSON_GRAMMAR, LlamaModel, json_schema_grammar
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.options import SamplingOptions
from ember.types import Message, ThinkSpec


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered and tokenized to fit the context window."""

    tokens: list[int]
    text: str  # the rendered prompt (a thinking template may end it inside the thinking part)
    dropped: int = 0  # the oldest messages left out so that it fits


def _think_variables(think: ThinkSpec) -> dict[str, Any]:
    """How templates are told whether to think: Hugging Face's `enable_thinking` (Qwen 3 and others), and
    `reasoning_effort` for a level (gpt-oss). Not set: the template's own default."""
    if think is None:
        return {}
    variables: dict[str, Any] = {"enable_thinking": bool(think)}
    if isinstance(think, str):
        variables["reasoning_effort"] = "high" if think == "max" else think
    return variables


class PromptBuilder:
    """Knows a loaded model's template and vocabulary; turns requests into prompt tokens."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        template: str | None = None,
        system: str | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.model = model
        self.default_system = system
        self.seed_messages = [Message.model_validate(dict(message)) for message in messages]
        self.template_source = template or model.chat_template() or CHATML_TEMPLATE
        self._templates: dict[str, ChatTemplate] = {}
        self.template = self._compile(self.template_source)

    def _compile(self, source: str) -> ChatTemplate:
        compiled = self._templates.get(source)
        if compiled is None:
            bos = self.model.token_text(self.model.bos_token) if self.model.bos_token >= 0 else ""
            eos = self.model.token_text(self.model.eos_token) if self.model.eos_token >= 0 else ""
            compiled = self._templates[source] = ChatTemplate(source, bos_token=bos, eos_token=eos)
        return compiled

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a full prompt: special tokens parsed, BOS added once when the model wants one."""
        tokens = self.model.tokenize(text, add_special=True, parse_special=True)
        bos = self.model.bos_token
        if self.model.add_bos and len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote BOS itself, and llama.cpp added another
        return tokens

    def chat_messages(self, messages: Sequence[Message], system: str | None) -> list[Message]:
        """The conversation as the model sees it: seed messages and the system prompt put in place."""
        conversation = list(messages)
        if self.seed_messages:
            first_non_system = next((i for i, m in enumerate(conversation) if m.role != "system"), len(conversation))
            conversation[first_non_system:first_non_system] = self.seed_messages
        if system:  # an explicit system prompt replaces any in the conversation
            conversation = [Message(role="system", content=system)] + [m for m in conversation if m.role != "system"]
        elif self.default_system and not any(m.role == "system" for m in conversation):
            conversation.insert(0, Message(role="system", content=self.default_system))
        return conversation

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: ThinkSpec = None,
    ) -> str:
        compiled = self._compile(template) if template else self.template
        views = [message.template_view() for message in messages]
        return compiled.render(views, tools=tools, **_think_variables(think))

    def chat_tokens(
        self,
        messages: Sequence[Message],
        *,
        num_ctx: int,
        sampling: SamplingOptions,
        truncate: bool,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Render and tokenize a conversation. With `truncate`, the oldest turns are dropped to fit."""
        prompt = self.fit_chat(
            messages, num_ctx=num_ctx, sampling=sampling, truncate=truncate, template=template, tools=tools
        )
        return prompt.tokens

    def fit_chat(
        self,
        messages: Sequence[Message],
        *,
        num_ctx: int,
        sampling: SamplingOptions,
        truncate: bool,
        template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: ThinkSpec = None,
    ) -> ChatPrompt:
        """Render and tokenize a conversation. With `truncate`, the oldest turns go until it fits (as Ollama
        does, the system messages and the last message always stay); `dropped` says how many went."""
        conversation = list(messages)

        def render() -> tuple[str, list[int]]:
            text = self.render_chat(conversation, template=template, tools=tools, think=think)
            return text, self.tokenize_prompt(text)

        text, tokens = render()
        if len(tokens) < num_ctx:
            return ChatPrompt(tokens, text)
        if not truncate:
            raise ContextOverflowError(len(tokens), num_ctx)
        limit = prompt_limit(num_ctx, sampling)
        dropped = 0
        while len(tokens) > limit:
            droppable = [i for i, m in enumerate(conversation) if m.role != "system"][:-1]
            if not droppable:
                raise ContextOverflowError(len(tokens), num_ctx)
            del conversation[droppable[0]]
            dropped += 1
            text, tokens = render()
        return ChatPrompt(tokens, text, dropped)

    def insertion_tokens(self, prefix: str, suffix: str, fim: tuple[int, int, int]) -> list[int]:
        """Fill in the middle: <prefix token> prefix <suffix token> suffix <middle token>, as llama.cpp's
        server builds an infill prompt; the model writes what goes between."""
        pre, suf, mid = fim
        text = self.model.tokenize
        tokens = [pre, *text(prefix, add_special=False, parse_special=False)]
        tokens += [suf, *text(suffix, add_special=False, parse_special=False), mid]
        if self.model.add_bos and self.model.bos_token >= 0:
            tokens.insert(0, self.model.bos_token)
        return tokens

    def fit(self, tokens: list[int], *, num_ctx: int, sampling: SamplingOptions, truncate: bool) -> list[int]:
        """Check a raw prompt fits; with `truncate`, keep its first num_keep tokens and as much of its end."""
        if len(tokens) < num_ctx:
            return tokens
        if not truncate:
            raise ContextOverflowError(len(tokens), num_ctx)
        limit = prompt_limit(num_ctx, sampling)
        keep = min(max(sampling.num_keep, 0), limit // 2)
        return tokens[:keep] + tokens[len(tokens) - (limit - keep) :]


def prompt_limit(num_ctx: int, sampling: SamplingOptions) -> int:
    """How long a truncated prompt may be: room is kept for the answer (num_predict, or a quarter, at most half)."""
    reserve = sampling.num_predict if sampling.num_predict > 0 else num_ctx // 4
    return max(1, num_ctx - max(1, min(reserve, num_ctx // 2)))


def grammar_for_format(format_: str | Mapping[str, Any] | None) -> str | None:
    """Ollama's `format`: "json" for any JSON value, a JSON schema for JSON that follows it, or nothing."""
    if format_ is None or format_ == "":
        return None
    if format_ == "json":
        return JSON_GRAMMAR
    if isinstance(format_, Mapping):
        return json_schema_grammar(json.dumps(format_))
    raise InvalidRequestError(f'format must be "json" or a JSON schema object, not {format_!r}')
