"""Model names are validated by construction: nothing a user types can name a path outside the store."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import InvalidRequestError
from ember.store.names import parse_model_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smollm2", "smollm2:latest"),
        ("SmolLM2:135M", "smollm2:135m"),
        ("library/llama3.2:3b-instruct-q4_K_M", "library/llama3.2:3b-instruct-q4_k_m"),
        ("registry.example.com:5000/team/model:v1", "registry.example.com:5000/team/model:v1"),
        ("hf.co/owner/repo", "hf.co/owner/repo:latest"),
    ],
)
def test_valid_names(text: str, expected: str) -> None:
    assert str(parse_model_name(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "../etc/passwd",
        "..",
        "a/../../b",
        "model:../x",
        "/abs/path",
        "a//b",
        "a/b/c/d",
        "name:",
        "na me",
        "x" * 400,
        "model:tag:extra",
        ".hidden",
        "-dash",
        "tab\tname",
        "nul\x00",
        "ünïcode",
    ],
)
def test_hostile_or_malformed_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid model name"):
        parse_model_name(text)


@given(st.text(max_size=60))
def test_no_accepted_name_has_a_dangerous_part(text: str) -> None:
    try:
        name = parse_model_name(text)
    except InvalidRequestError:
        return
    for part in (name.host, name.namespace, name.model, name.tag):
        if part is not None:
            assert part not in ("", ".", "..") and "/" not in part and "\\" not in part and "\x00" not in part
            assert not part.startswith(".")
