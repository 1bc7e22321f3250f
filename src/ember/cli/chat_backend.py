"""Where the REPL's answers come from: the running server when one answers, else ember.Model in this process.

Both backends take the same conversation and options and yield the same ChatResponse chunks, so the REPL
behaves the same either way. Closing the iterator of an answer cancels it (in-process: the sequence is
dropped; through the server: the stream is closed, and the server cancels the request).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ember.cli import remote
from ember.types import ChatResponse, Message

log = logging.getLogger(__name__)


class ChatBackend(Protocol):
    model: str  # the name the user gave

    def chat(self, messages: Sequence[Message], options: dict[str, Any], format_: Any) -> Iterator[ChatResponse]: ...
    def count(self, messages: Sequence[Message]) -> int: ...
    def facts(self) -> dict[str, Any]: ...
    def reload(self, load: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class LocalBackend:
    """ember.Model in this process."""

    def __init__(self, model: str, load: dict[str, Any]) -> None:
        from ember.model import Model
        from ember.store.resolve import resolve_model

        self.model = model
        self._source = resolve_model(model)
        self._model = Model(self._source, **load)

    def chat(self, messages: Sequence[Message], options: dict[str, Any], format_: Any) -> Iterator[ChatResponse]:
        return self._model.chat(list(messages), stream=True, format=format_, options=options)

    def count(self, messages: Sequence[Message]) -> int:
        prompts = self._model.loaded.prompts
        return len(prompts.tokenize_prompt(prompts.render_chat(prompts.chat_messages(messages, None))))

    def facts(self) -> dict[str, Any]:
        from ember.cli.models import model_facts

        facts = model_facts(self._source, self._model.info)
        facts["template"] = facts["template"] or self._model.loaded.prompts.template_source
        return facts

    def reload(self, load: dict[str, Any]) -> None:
        from ember.model import Model

        self._model.close()
        self._model = Model(self._source, **load)

    def close(self) -> None:
        self._model.close()


class RemoteBackend:
    """The ember server at EMBER_HOST: /api/chat, streamed. Tokens are counted with a local vocabulary."""

    def __init__(self, model: str, served: str, load: dict[str, Any]) -> None:
        self.model = model
        self._served = served
        self._load = dict(load)
        self._facts: dict[str, Any] | None = None
        self._counter: Any = None
        try:  # the same file the server reads, when it is on this machine: exact counts through the template
            from ember.engine.llamacpp import LlamaModel
            from ember.options import load_options
            from ember.prompt import PromptBuilder
            from ember.store.resolve import resolve_model

            source = resolve_model(model)
            vocab = LlamaModel.vocab_only(source.path, load_options({}))
            self._vocab = vocab
            self._counter = PromptBuilder(
                vocab, template=source.template, system=source.system, messages=source.messages
            )
        except Exception:  # a server elsewhere, a model only it has: estimate
            log.debug("counting tokens by estimate", exc_info=True)

    def chat(self, messages: Sequence[Message], options: dict[str, Any], format_: Any) -> Iterator[ChatResponse]:
        body: dict[str, Any] = {
            "model": self._served,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "options": {**self._load, **options},
        }
        if format_ is not None:
            body["format"] = format_
        for line in remote.stream("/api/chat", {**body, "stream": True}):
            yield ChatResponse(**line)

    def count(self, messages: Sequence[Message]) -> int:
        if self._counter is not None:
            prompts = self._counter
            return len(prompts.tokenize_prompt(prompts.render_chat(prompts.chat_messages(messages, None))))
        return sum(len(m.content) // 4 + 4 for m in messages)  # about four characters a token, and the markup

    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts, _ = remote.show(self._served)
        return self._facts

    def reload(self, load: dict[str, Any]) -> None:
        self._load = dict(load)
        self._served = remote.load(self.model, load) or self._served

    def close(self) -> None:
        if self._counter is not None:
            self._vocab.close()


def open_backend(model: str, load: dict[str, Any]) -> ChatBackend:
    """The server's backend when one answers (and can read the model), else the in-process one."""
    if remote.available():
        served = remote.load(model, load)
        if served is not None:
            return RemoteBackend(model, served, load)
    return LocalBackend(model, load)
