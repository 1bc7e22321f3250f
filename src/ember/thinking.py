"""Thinking models: which templates think, and splitting the answer's `<think>...</think>` part from the rest.

A model thinks when its chat template writes the thinking tags (Ollama's rule: the template contains both
`<think>` and `</think>`). Its answer then starts with its reasoning inside those tags, or, when the template
itself ends the prompt with the opening tag, goes straight into the reasoning. `ThinkingParser` follows
Ollama's thinking parser (thinking/parser.go): the reasoning comes out as `thinking`, the rest as content,
whitespace around the tags is dropped, and text that may be the start of a tag is held back until it is
clear, so the result does not depend on how the text is split.
"""

from __future__ import annotations

import enum

OPENING_TAG, CLOSING_TAG = "<think>", "</think>"


def template_thinks(template: str | None) -> bool:
    """Whether a chat template writes thinking tags (so the model it belongs to thinks)."""
    return bool(template) and OPENING_TAG in template and CLOSING_TAG in template  # type: ignore[operator]


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt already opened the thinking part (the answer starts inside it)."""
    return prompt.rstrip().endswith(OPENING_TAG)


class _State(enum.Enum):
    LOOKING_FOR_OPENING = enum.auto()  # only whitespace so far
    THINKING_STARTED = enum.auto()  # the opening tag seen; whitespace after it is dropped
    THINKING = enum.auto()
    THINKING_DONE_EATING_WHITESPACE = enum.auto()  # the closing tag seen; whitespace after it is dropped
    THINKING_DONE = enum.auto()


class ThinkingParser:
    """Splits generated text, fed piece by piece, into (thinking, content).

    >>> parser = ThinkingParser()
    >>> parser.push("<think>Two and two") , parser.push(" is four.</thi"), parser.push("nk>\\n4", final=True)
    (('Two and two', ''), (' is four.', ''), ('', '4'))
    """

    def __init__(self, *, opened: bool = False, opening: str = OPENING_TAG, closing: str = CLOSING_TAG) -> None:
        self.opening, self.closing = opening, closing
        self._state = _State.THINKING_STARTED if opened else _State.LOOKING_FOR_OPENING
        self._pending = ""

    def push(self, text: str, *, final: bool = False) -> tuple[str, str]:
        """The thinking and the content this piece (and, when `final`, everything held back) comes to."""
        self._pending += text
        thinking, content = [], []
        while True:
            more, think_part, content_part = self._eat()
            thinking.append(think_part)
            content.append(content_part)
            if not more:
                break
        if final and self._pending:  # the end: what was held back is decided now
            if self._state in (_State.THINKING, _State.THINKING_STARTED):
                thinking.append(self._pending)
            elif self._state is _State.LOOKING_FOR_OPENING:
                content.append(self._pending)
            self._pending = ""
        return "".join(thinking), "".join(content)

    def _eat(self) -> tuple[bool, str, str]:
        """One step of the state machine: (go on, thinking, content)."""
        pending = self._pending
        if self._state is _State.LOOKING_FOR_OPENING:
            trimmed = pending.lstrip()
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening) :].lstrip()
                self._pending = after
                self._state = _State.THINKING if after else _State.THINKING_STARTED
                return True, "", ""
            if self.opening.startswith(trimmed):  # whitespace, or a part of the opening tag: wait
                return False, "", ""
            self._state = _State.THINKING_DONE  # no thinking: the text (whitespace and all) is the answer
            self._pending = ""
            return False, "", pending
        if self._state is _State.THINKING_STARTED:
            trimmed = pending.lstrip()
            self._pending = trimmed
            if not trimmed:
                return False, "", ""
            self._state = _State.THINKING
            return True, "", ""
        if self._state is _State.THINKING:
            if self.closing in pending:
                thinking, _, rest = pending.partition(self.closing)
                rest = rest.lstrip()
                self._pending = ""
                self._state = _State.THINKING_DONE if rest else _State.THINKING_DONE_EATING_WHITESPACE
                return False, thinking, rest
            held = _overlap(pending, self.closing)
            self._pending = pending[len(pending) - held :] if held else ""
            return False, pending[: len(pending) - held], ""
        if self._state is _State.THINKING_DONE_EATING_WHITESPACE:
            trimmed = pending.lstrip()
            self._pending = ""
            if trimmed:
                self._state = _State.THINKING_DONE
            return False, "", trimmed
        self._pending = ""
        return False, "", pending


def _overlap(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a start of `tag`."""
    for length in range(min(len(tag), len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
