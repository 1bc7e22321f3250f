"""Splitting a thinking model's answer into its reasoning and the rest (a port of Ollama's parser)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ember.thinking import ThinkingParser, prompt_opens_thinking, template_thinks

ANSWERS = [
    "<think>Two and two make four.</think>\n\n4",
    "  <think>\nhmm</think>The answer",
    "no thinking here, <think> in the middle stays",
    "<think>still thinking when the answer was cut off",
    "<thi",
    "",
]


def _split(text: str, cuts: list[int], opened: bool = False) -> tuple[str, str]:
    parser, thinking, content, start = ThinkingParser(opened=opened), [], [], 0
    points = [*sorted({min(cut, len(text)) for cut in cuts}), len(text)]
    for index, point in enumerate(points):
        piece_thinking, piece_content = parser.push(text[start:point], final=index == len(points) - 1)
        thinking.append(piece_thinking)
        content.append(piece_content)
        start = point
    return "".join(thinking), "".join(content)


def test_the_reasoning_and_the_answer_come_apart() -> None:
    assert _split(ANSWERS[0], []) == ("Two and two make four.", "4")
    assert _split(ANSWERS[1], []) == ("hmm", "The answer")
    assert _split(ANSWERS[2], []) == ("", ANSWERS[2])  # no opening tag first: all of it is the answer
    assert _split(ANSWERS[3], []) == ("still thinking when the answer was cut off", "")
    assert _split(ANSWERS[4], []) == ("", "<thi")  # what looked like a tag is released at the end
    # the template opened the thinking part itself: the answer starts inside it
    assert _split("The user greets me.</think>Hello!", [], opened=True) == ("The user greets me.", "Hello!")


@given(st.sampled_from(ANSWERS), st.lists(st.integers(0, 60), max_size=8))
def test_the_split_never_depends_on_how_the_text_arrives(text: str, cuts: list[int]) -> None:
    assert _split(text, cuts) == _split(text, [])


def test_a_closing_tag_split_over_pieces_is_held_back() -> None:
    parser = ThinkingParser()
    assert parser.push("<think>so") == ("so", "")
    assert parser.push(" it is</th") == (" it is", "")  # "</th" may be the tag: held
    assert parser.push("ink> 42", final=True) == ("", "42")


def test_templates_that_think() -> None:
    assert template_thinks("{% if enable_thinking %}<think>{% endif %}...</think>")
    assert not template_thinks("<|im_start|>{{ m.content }}") and not template_thinks(None)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n") and not prompt_opens_thinking("assistant\n")
