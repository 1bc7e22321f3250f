"""UTF-8 safe incremental decoding and stop-string hold-back, checked on arbitrary inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ember.engine.text import StopMatcher, Utf8Decoder


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@given(st.text(), st.lists(st.integers(min_value=0, max_value=200)))
def test_decoder_never_splits_a_character(text: str, cuts: list[int]) -> None:
    decoder = Utf8Decoder()
    emitted = [decoder.decode(piece) for piece in split_at(text.encode(), cuts)]
    emitted.append(decoder.flush())
    assert "".join(emitted) == text
    assert all("\ufffd" not in part for part in emitted)


def test_decoder_holds_a_partial_character_until_it_is_whole() -> None:
    decoder = Utf8Decoder()
    smile = "😀".encode()
    assert [decoder.decode(smile[:1]), decoder.decode(smile[1:3]), decoder.decode(smile[3:])] == ["", "", "😀"]


def test_decoder_replaces_bytes_that_can_never_be_text() -> None:
    decoder = Utf8Decoder()
    assert decoder.decode(b"ok \xff") == "ok \ufffd"
    assert decoder.decode(b"\xe2\x82") == ""
    assert decoder.flush() == "\ufffd"


def feed(matcher: StopMatcher, chunks: list[str]) -> tuple[list[str], bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        out.append(text)
        if stopped:
            return out, True
    tail, stopped = matcher.finish()
    out.append(tail)
    return out, stopped


@given(
    st.text(alphabet="ab#x", max_size=40),
    st.lists(st.integers(min_value=0, max_value=40)),
    st.lists(st.text(alphabet="ab#", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_are_cut_exactly_and_never_leak(text: str, cuts: list[int], stops: list[str]) -> None:
    pieces = [piece.decode() for piece in split_at(text.encode(), cuts)]
    emitted, stopped = feed(StopMatcher(tuple(stops)), pieces)
    found = [text.find(stop) for stop in stops if stop in text]
    expected = text[: min(found)] if found else text
    assert "".join(emitted) == expected
    assert stopped == bool(found)
    # Nothing emitted so far may ever contain a stop string, at any moment of the stream.
    for end in range(1, len(emitted) + 1):
        assert not any(stop in "".join(emitted[:end]) for stop in stops)


def test_a_stop_string_split_over_chunks_is_held_then_dropped() -> None:
    matcher = StopMatcher(("</answer>",))
    assert matcher.push("Paris</") == ("Paris", False)
    assert matcher.push("ans") == ("", False)
    assert matcher.push("wer> and more") == ("", True)


def test_held_text_that_turns_out_not_to_stop_is_released() -> None:
    matcher = StopMatcher(("###",))
    assert matcher.push("a #") == ("a ", False)
    assert matcher.push("# b") == ("## b", False)
    assert matcher.push("#") == ("", False)
    assert matcher.flush() == "#"


def test_a_longer_stop_string_that_starts_earlier_wins_once_complete() -> None:
    matcher = StopMatcher(("#", "a#a"))
    assert matcher.push("a#") == ("", False)  # '#' is found, but 'a#a' may still complete from the 'a' before it
    assert matcher.push("a") == ("", True)
    unfinished = StopMatcher(("#", "a#a"))
    assert unfinished.push("a#") == ("", False)
    assert unfinished.flush() == "a"  # 'a#a' never completed: the text is cut at '#'
    held = StopMatcher(("a", "baa"))
    assert held.push("ba") == ("", False)
    assert held.finish() == ("b", True)  # the stream ended: 'a' did stop it (found by hypothesis)
