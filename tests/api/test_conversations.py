"""The native conversation routes against a real server and the real default model: turns, branches, export and
import, pins, a client that leaves mid-answer, and long conversations under each context strategy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import running_server

OPTIONS = {"num_ctx": 512, "num_predict": 8, "temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conversations-home")


@pytest.fixture(scope="module")
def base(home: Path) -> Iterator[str]:
    with running_server(home=home, num_parallel=4) as url:
        yield url


@pytest.fixture(scope="module")
def api(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=600) as client:
        yield client


def create(api: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = api.post("/api/conversations", json={"options": OPTIONS, **fields})
    assert response.status_code == 200, response.text
    return response.json()["conversation"]


def chat(api: httpx.Client, conversation_id: str, content: str | None, **fields: Any) -> list[dict[str, Any]]:
    """The NDJSON lines of one streamed turn."""
    body = {"content": content, **fields} if content is not None else fields
    with api.stream("POST", f"/api/conversations/{conversation_id}/chat", json=body) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def branch(api: httpx.Client, conversation_id: str) -> list[dict[str, Any]]:
    return api.get(f"/api/conversations/{conversation_id}").json()["messages"]


def test_a_turn_streams_and_is_stored_with_its_context(api: httpx.Client) -> None:
    conversation = create(api, title="first", system="You are terse.")
    lines = chat(api, conversation["id"], "Which city is the capital of France? Answer in one word.")
    final = lines[-1]
    assert final["done"] and all(not line["done"] for line in lines[:-1])
    text = "".join(line["message"]["content"] for line in lines)
    context = final["context"]
    assert context["strategy"] == "sliding" and context["limit"] == 512 and context["dropped"] == 0
    assert context["prompt"] == final["prompt_eval_count"] + final["prompt_cached_count"]
    assert context["used"] == context["prompt"] + final["eval_count"] <= context["limit"]
    stored = branch(api, conversation["id"])
    assert [(m["role"], m["status"]) for m in stored] == [("user", "completed"), ("assistant", "completed")]
    assert stored[1]["id"] == final["message_id"] and stored[1]["content"] == text
    assert stored[1]["info"]["context"]["used"] == context["used"]

    whole = api.post(
        f"/api/conversations/{conversation['id']}/chat", json={"content": "And of Italy?", "stream": False}
    )
    assert whole.status_code == 200 and whole.json()["message"]["content"]
    assert whole.json()["context"]["messages"] == 3 and len(branch(api, conversation["id"])) == 4
    meter = api.get(f"/api/conversations/{conversation['id']}/context").json()["context"]
    assert 0 < meter["used"] <= meter["limit"] == 512


def test_list_search_rename_and_delete(api: httpx.Client) -> None:
    conversation = create(
        api,
        title="zebra notes",
        messages=[{"role": "user", "content": "the quokka smiles"}, {"role": "assistant", "content": "yes"}],
    )
    found = api.get("/api/conversations", params={"q": "quokka"}).json()
    assert [row["id"] for row in found["conversations"]] == [conversation["id"]]
    assert "[quokka]" in found["conversations"][0]["snippet"] and found["conversations"][0]["message_count"] == 2
    renamed = api.patch(f"/api/conversations/{conversation['id']}", json={"title": "giraffe notes", "strategy": "none"})
    assert renamed.json()["conversation"]["title"] == "giraffe notes"
    assert api.get("/api/conversations", params={"q": "giraffe"}).json()["total"] == 1
    page = api.get("/api/conversations", params={"limit": 1}).json()
    assert len(page["conversations"]) == 1 and page["next_offset"] == 1 and page["total"] >= 2
    assert api.delete(f"/api/conversations/{conversation['id']}").json() == {"id": conversation["id"], "deleted": True}
    gone = api.get(f"/api/conversations/{conversation['id']}")
    assert gone.status_code == 404 and "no conversation" in gone.json()["error"]
    assert api.get("/api/conversations/not-an-id").status_code == 404
    bad = api.post("/api/conversations", json={"strategy": "forgetful"})
    assert bad.status_code == 400 and "strategy" in bad.json()["error"]


def test_regenerate_edit_and_fork_make_siblings(api: httpx.Client) -> None:
    conversation = create(api, title="branches")
    cid = conversation["id"]
    first = chat(api, cid, "Name a colour.")[-1]
    question_id = first["added_message_ids"][0]
    again = api.post(f"/api/conversations/{cid}/chat", json={})
    assert again.status_code == 400 and "regenerate" in again.json()["error"]  # it ends with an answer already
    regenerated = api.post(
        f"/api/conversations/{cid}/messages/{first['message_id']}/regenerate", json={"options": {"seed": 3}}
    )
    lines = [json.loads(line) for line in regenerated.text.splitlines() if line.strip()]
    final = lines[-1]
    assert final["parent_id"] == question_id and final["message_id"] != first["message_id"]

    edited = api.post(
        f"/api/conversations/{cid}/messages/{question_id}/edit", json={"content": "Name an animal.", "stream": False}
    )
    assert edited.status_code == 200
    tree = api.get(f"/api/conversations/{cid}", params={"view": "tree"}).json()
    by_id = {m["id"]: m for m in tree["messages"]}
    answers = [m for m in tree["messages"] if m["parent_id"] == question_id]
    assert {m["id"] for m in answers} == {first["message_id"], final["message_id"]}  # regenerate: siblings
    edited_question = by_id[edited.json()["added_message_ids"][0]]
    assert edited_question["parent_id"] is None and edited_question["content"] == "Name an animal."  # edit: a sibling
    assert tree["active_path"] == [edited_question["id"], edited.json()["message_id"]]

    in_place = api.post(f"/api/conversations/{cid}/fork", json={"message_id": first["message_id"]}).json()
    assert [m["id"] for m in in_place["messages"]] == [question_id, first["message_id"]]
    follow = chat(api, cid, "Another one.")[-1]
    assert follow["added_message_ids"] and branch(api, cid)[1]["id"] == first["message_id"]
    copy = api.post(f"/api/conversations/{cid}/fork", json={"message_id": question_id, "new_conversation": True}).json()
    assert copy["conversation"]["id"] != cid and [m["content"] for m in copy["messages"]] == ["Name a colour."]

    wrong = api.post(f"/api/conversations/{cid}/messages/{question_id}/regenerate", json={})
    assert wrong.status_code == 400 and "regenerate an assistant" in wrong.json()["error"]


def test_export_then_import_gives_the_same_tree_and_pins_stick(api: httpx.Client) -> None:
    conversation = create(api, title="to export", system="Be brief.")
    cid = conversation["id"]
    first = chat(api, cid, "Say one word.")[-1]
    api.post(f"/api/conversations/{cid}/messages/{first['message_id']}/regenerate", json={"stream": False})
    pinned = api.patch(f"/api/conversations/{cid}/messages/{first['added_message_ids'][0]}", json={"pinned": True})
    assert pinned.json()["message"]["pinned"] is True
    document = api.get(f"/api/conversations/{cid}/export").json()
    assert document["format"] == "ember.conversation" and len(document["messages"]) == 3
    imported = api.post("/api/conversations/import", json=document).json()
    copy = api.get(f"/api/conversations/{imported['conversation']['id']}", params={"view": "tree"}).json()
    original = api.get(f"/api/conversations/{cid}", params={"view": "tree"}).json()

    def shape(tree: dict[str, Any]) -> list[tuple[Any, ...]]:
        index = {m["id"]: i for i, m in enumerate(tree["messages"])}
        return [(index.get(m["parent_id"]), m["role"], m["content"], m["pinned"]) for m in tree["messages"]]

    assert shape(copy) == shape(original) and copy["conversation"]["system"] == "Be brief."
    assert [m["content"] for m in copy["messages"] if m["id"] in copy["active_path"]] == [
        m["content"] for m in original["messages"] if m["id"] in original["active_path"]
    ]
    broken = api.post(
        "/api/conversations/import",
        json={"conversation": {}, "messages": [{"id": "a", "parent_id": "z", "role": "user"}]},
    )
    assert broken.status_code == 400 and "must come before it" in broken.json()["error"]


def test_strategy_none_refuses_with_the_numbers_and_writes_nothing(api: httpx.Client) -> None:
    conversation = create(api, strategy="none", options={**OPTIONS, "num_predict": 64})
    refused = api.post(f"/api/conversations/{conversation['id']}/chat", json={"content": "word " * 600})
    assert refused.status_code == 400
    assert (
        "num_ctx 512" in refused.json()["error"]
        and "strategy sliding, summarize or selective" in refused.json()["error"]
    )
    assert branch(api, conversation["id"]) == []


def test_a_client_that_leaves_mid_answer_leaves_the_partial_answer(api: httpx.Client) -> None:
    conversation = create(api, options={**OPTIONS, "num_predict": 400})
    with api.stream(
        "POST",
        f"/api/conversations/{conversation['id']}/chat",
        json={"content": "Tell me a long story about a dragon."},
    ) as response:
        received = ""
        for line in response.iter_lines():
            received += json.loads(line)["message"]["content"]
            if len(received.split()) >= 6:
                break  # closes the connection mid-answer
    for _ in range(100):
        stored = branch(api, conversation["id"])
        if len(stored) == 2 and stored[1]["status"] == "incomplete":
            break
        threading.Event().wait(0.1)
    assert stored[0]["role"] == "user" and stored[1]["partial"] and stored[1]["status"] == "incomplete"
    assert stored[1]["content"].startswith(received.strip()[:10]) and len(stored[1]["content"]) >= len(received) // 2
    follow = chat(api, conversation["id"], "Go on.", options={"num_predict": 4})[-1]
    assert follow["context"]["messages"] == 3  # the partial answer is part of the history


LONG = {"num_ctx": 256, "num_predict": 4, "temperature": 0, "repeat_penalty": 1.0}


def long_conversation(api: httpx.Client, strategy: str) -> tuple[str, list[dict[str, Any]]]:
    """40 short turns, a pinned fact first: more than three times num_ctx in all. The final line of each turn."""
    conversation = create(
        api, title=f"long {strategy}", system="You are a weather bot.", strategy=strategy, options=LONG
    )
    cid = conversation["id"]
    first = chat(api, cid, "Remember: my locker code is 7391.", pinned=True)[-1]
    assert first["context"]["strategy"] == strategy
    finals = [first]
    for n in range(1, 39):
        finals.append(chat(api, cid, f"Turn {n}: weather on day {n}?")[-1])
    finals.append(chat(api, cid, "What is my locker code?", return_prompt=True)[-1])
    return cid, finals


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_forty_turns_run_to_the_end_under_each_strategy(api: httpx.Client) -> None:
    results: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    errors: list[BaseException] = []

    def run(strategy: str) -> None:
        try:
            results[strategy] = long_conversation(api, strategy)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(s,)) for s in ("sliding", "summarize", "selective")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for strategy, (cid, finals) in results.items():
        assert len(finals) == 40 and all(f["done"] and f["eval_count"] > 0 for f in finals), strategy
        tree = api.get(f"/api/conversations/{cid}").json()["messages"]
        assert len(tree) == 80 and sum(m.get("tokens", 0) for m in tree) > 3 * LONG["num_ctx"], strategy
        assert finals[-1]["context"]["dropped"] + finals[-1]["context"]["summarized"] > 0, strategy
        for final in finals:
            context = final["context"]
            assert context["used"] <= context["limit"] == 256 and context["prompt"] <= context["budget"], strategy
            assert context["prompt"] == final["prompt_eval_count"] + final["prompt_cached_count"]
        tokens = finals[-1]["context"]["prompt_tokens"]
        prompt = api.post("/api/detokenize", json={"model": "smollm2", "tokens": tokens}).json()["content"]
        assert prompt.lstrip().startswith("system\nYou are a weather bot."), strategy  # the system prompt first
        assert "my locker code is 7391" in prompt, strategy  # the pinned fact, in the prompt of the last turn
        assert "What is my locker code?" in prompt and "Turn 38:" in prompt, strategy  # the last turns
        if strategy == "summarize":
            assert "Summary of the conversation so far:" in prompt
            assert finals[-1]["context"]["summarized"] > 0
