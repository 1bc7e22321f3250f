"""Batch inputs: every format becomes OpenAI requests; every bad line is named with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.jobs.batch_input import BatchInputError, PromptDefaults, parse_openai_jsonl, read_inputs

DEFAULTS = PromptDefaults(model="smollm2", system="Be brief.", options={"temperature": 0, "num_predict": 8})


def openai_line(custom_id: str, **body: object) -> str:
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload})


def test_openai_jsonl_lines_keep_their_order_and_bodies() -> None:
    lines = parse_openai_jsonl("\n".join([openai_line("a"), "", openai_line("b", max_tokens=3)]) + "\n")
    assert [(line.index, line.custom_id, line.line) for line in lines] == [(0, "a", 1), (1, "b", 3)]
    assert lines[1].body["max_tokens"] == 3 and lines[1].prompt == "Hi"


def test_every_bad_openai_line_is_reported_with_its_number() -> None:
    text = "\n".join(
        [
            openai_line("a"),
            "{not json",
            json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
            openai_line("a"),
            json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/images", "body": {}}),
            json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        ]
    )
    with pytest.raises(BatchInputError) as failure:
        parse_openai_jsonl(text, source="in.jsonl")
    assert [line for line, _ in failure.value.problems] == [2, 3, 4, 5, 6]
    message = str(failure.value)
    assert "in.jsonl has 5 invalid line(s)" in message
    assert "line 2: not valid JSON" in message and "line 3: method must be POST" in message
    assert "line 4: custom_id 'a' is used twice" in message and "line 6: custom_id must be" in message


def test_prompt_inputs_become_chat_bodies_with_the_options(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First prompt\n\nSecond prompt\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"prompt": "Third", "temperature": 0.5, "options": {"top_k": 5}})
        + "\n"
        + json.dumps("Fourth")
        + "\n"
    )
    (tmp_path / "c.csv").write_text('prompt,num_predict,custom_id\n"Fifth, with a comma",3,five\n')
    lines = read_inputs([str(tmp_path)], DEFAULTS, per_line=True)
    expected = ["First prompt", "Second prompt", "Third", "Fourth", "Fifth, with a comma"]
    assert [line.prompt for line in lines] == expected
    assert [line.custom_id for line in lines][:2] == ["a.txt:1", "a.txt:3"] and lines[4].custom_id == "five"
    first = lines[0].body
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First prompt"},
    ]
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("smollm2", 0, 8)
    assert (lines[2].body["temperature"], lines[2].body["top_k"]) == (0.5, 5)
    assert lines[4].body["max_tokens"] == 3
    whole = read_inputs([str(tmp_path / "a.txt")], DEFAULTS)  # without --lines: the file is one prompt
    assert len(whole) == 1 and whole[0].prompt == "First prompt\n\nSecond prompt\n"


def test_bad_prompt_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n{"prompt": "x", "temprature": 1}\n')
    with pytest.raises(BatchInputError) as failure:
        read_inputs([str(path)], DEFAULTS)
    message = str(failure.value)
    assert str(path) in message and 'line 2: a line needs a "prompt"' in message
    assert "line 3: unknown option(s) temprature" in message


def test_a_glob_that_matches_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no file matches"):
        read_inputs([str(tmp_path / "*.txt")], DEFAULTS)
