"""A server killed (SIGKILL) in the middle of an answer: the question and the answer so far are kept."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from ember.conversations.store import ConversationStore
from tests.server import serve_process


@pytest.mark.slow
def test_kill_9_during_an_answer_leaves_the_question_and_the_partial_answer(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with serve_process(env={"EMBER_HOME": str(home)}) as (process, base, _):
        conversation = httpx.post(
            f"{base}/api/conversations",
            json={"options": {"num_ctx": 512, "num_predict": 2000, "temperature": 0}},
            timeout=60,
        ).json()["conversation"]
        received, first_text = "", None
        body = {"content": "Tell me a long story about a dragon and a knight."}
        with httpx.stream("POST", f"{base}/api/conversations/{conversation['id']}/chat", json=body, timeout=300) as r:
            for line in r.iter_lines():
                received += json.loads(line)["message"]["content"]
                first_text = first_text or (time.monotonic() if received else None)
                if first_text and len(received.split()) >= 10 and time.monotonic() - first_text > 1.0:
                    process.kill()  # mid-answer: no chance to clean up
                    process.wait(timeout=30)
                    break
        assert process.returncode == -9

    question, answer = ConversationStore(home / "ember.db").branch(conversation["id"])
    assert question.role == "user" and question.content == body["content"] and question.status == "completed"
    assert answer.role == "assistant" and answer.status == "in_progress" and answer.partial
    assert answer.content and (received.startswith(answer.content) or answer.content.startswith(received))

    with serve_process(env={"EMBER_HOME": str(home)}) as (_, base, _):  # readable through the API after a restart
        stored = httpx.get(f"{base}/api/conversations/{conversation['id']}", timeout=60).json()["messages"]
        assert [m["content"] for m in stored] == [question.content, answer.content] and stored[1]["partial"]
