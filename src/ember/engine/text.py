"""Turning a stream of token bytes into a stream of text that is safe to show.

Two rules: a multi-byte UTF-8 character split across tokens is held until it is whole, and text that might
be the beginning of a stop string is held until it is known not to be one.
"""

from __future__ import annotations

import codecs


class Utf8Decoder:
    """Decodes token pieces incrementally; never emits half a character.

    >>> decoder = Utf8Decoder()
    >>> decoder.decode("é".encode()[:1]), decoder.decode("é".encode()[1:])
    ('', 'é')
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is left at the end; an incomplete character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text without ever releasing part of one.

    `push` returns the text that is safe to emit and whether a stop string was found; the text after a
    stop string is dropped. A stop string that spans several tokens is caught because text that could still
    become one stays held back.

    >>> matcher = StopMatcher(("###",))
    >>> matcher.push("Hello #"), matcher.push("## world")
    (('Hello ', False), ('', True))
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        first = -1
        for stop in self._stops:
            found = buffer.find(stop)
            if found != -1 and (first == -1 or found < first):
                first = found
        if first != -1:
            pending = self._pending_start(buffer, first)
            if pending is None:
                self._held = ""
                return buffer[:first], True
            # A longer stop string may still complete and start earlier than the one found: wait for it.
            self._held = buffer[pending:]
            return buffer[:pending], False
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation, cut at a stop string it already holds."""
        return self.finish()[0]

    def finish(self) -> tuple[str, bool]:
        """The held text at the end of generation, and whether a stop string cut it (one that was held back
        while a longer stop string starting earlier could still complete)."""
        held, self._held = self._held, ""
        found = [held.find(stop) for stop in self._stops if stop in held]
        return (held[: min(found)], True) if found else (held, False)

    def _pending_start(self, buffer: str, before: int) -> int | None:
        """The earliest position before `before` where the rest of `buffer` begins a longer stop string."""
        for start in range(max(0, len(buffer) - self._longest + 1), before):
            rest = buffer[start:]
            if any(len(stop) > len(rest) and stop.startswith(rest) for stop in self._stops):
                return start
        return None

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for length in range(min(self._longest - 1, len(buffer)), 0, -1):
            suffix = buffer[-length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
