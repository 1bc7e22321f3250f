"""OpenAI's Files and Batches APIs through the real `openai` SDK, against a real server and the default model."""

from __future__ import annotations

import collections
import io
import json
import time
from collections.abc import Iterator

import openai
import pytest

from tests.server import running_server

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    home = tmp_path_factory.mktemp("batches-home")
    with running_server(home=home, num_parallel=2) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def chat_line(custom_id: str, text: str, **body: object) -> dict:
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 6, **body}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"temperature": 0, **payload}}


def upload(client: openai.OpenAI, lines: list[dict], name: str = "input.jsonl") -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def wait(client: openai.OpenAI, batch_id: str, until: tuple[str, ...], timeout: float = 300) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_upload_create_poll_download_output_and_error_files(client) -> None:
    lines = [chat_line(f"q{i}", f"Say the number {i}.") for i in range(4)]
    lines.insert(2, chat_line("bad", "Hi", temperature=-3))  # valid JSON, refused when it runs
    file = client.files.retrieve(upload(client, lines))
    assert (file.object, file.purpose, file.status, file.filename) == ("file", "batch", "processed", "input.jsonl")
    batch = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    batch = wait(client, batch.id, ("completed", "failed"))
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 4, "failed": 1}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.model == "smollm2"
    assert batch.usage.output_tokens >= 4 and batch.usage.total_tokens > batch.usage.output_tokens
    outputs = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in outputs] == ["q0", "q1", "q2", "q3"]
    for line in outputs:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"].strip()
    (error,) = jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert "temperature" in error["response"]["body"]["error"]["message"]
    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes == len(
        client.files.content(output_file.id).content
    )
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def test_a_malformed_line_is_refused_at_upload_with_its_line_number(client) -> None:
    data = json.dumps(chat_line("ok", "Hi")) + "\n" + '{"custom_id": "x", "method": "POST", "url": "/v1/chat/comp\n'
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("broken.jsonl", io.BytesIO(data.encode())), purpose="batch")
    assert "line 2: not valid JSON" in str(refused.value)
    duplicate = [chat_line("same", "a"), chat_line("same", "b")]
    with pytest.raises(openai.BadRequestError, match="line 2: custom_id 'same' is used twice"):
        upload(client, duplicate)


def test_a_line_for_another_endpoint_fails_validation_with_its_line_number(client) -> None:
    completion = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "smollm2"}}
    batch = client.batches.create(
        input_file_id=upload(client, [chat_line("a", "Hi"), completion]), endpoint=CHAT, completion_window="24h"
    )
    batch = wait(client, batch.id, ("failed", "completed"))
    assert batch.status == "failed" and batch.failed_at
    (problem,) = batch.errors.data
    assert problem.line == 2 and "differs from the batch's endpoint" in problem.message


def test_cancel_mid_batch_keeps_the_finished_lines(client) -> None:
    lines = [chat_line(f"c{i}", f"Write a long story about the number {i}.", max_tokens=24) for i in range(12)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait(client, batch.id, ("cancelled",))
    finished, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert 2 <= len(finished) == batch.request_counts.completed < 12
    assert all(line["response"]["status_code"] == 200 for line in finished)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    ids = collections.Counter(line["custom_id"] for line in finished + errors)
    assert sorted(ids) == sorted(f"c{i}" for i in range(12)) and set(ids.values()) == {1}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(
            wait(
                client,
                client.batches.create(
                    input_file_id=upload(client, lines[:1]), endpoint=CHAT, completion_window="24h"
                ).id,
                ("completed",),
            ).id
        )


def test_an_expired_window_ends_the_batch_as_openai_does(client) -> None:
    lines = [chat_line(f"e{i}", f"Count slowly to {i + 20}.", max_tokens=48) for i in range(16)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="2s")
    batch = wait(client, batch.id, ("expired", "completed"))
    assert batch.status == "expired" and batch.expired_at
    finished, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert len(finished) + len(errors) == 16 and errors
    expired = [line for line in errors if line["response"] is None]
    assert expired and all(line["error"]["code"] == "batch_expired" for line in expired)
    assert expired[0]["error"]["message"] == "This request could not be executed before the completion window expired."


def test_embeddings_batch_and_pagination(client) -> None:
    lines = [
        {"custom_id": f"v{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "smollm2", "input": t}}
        for i, t in enumerate(["red", "green"])
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/embeddings", completion_window="1h"
    )
    batch = wait(client, batch.id, ("completed", "failed"))
    vectors = [line["response"]["body"]["data"][0]["embedding"] for line in jsonl(client, batch.output_file_id)]
    assert len(vectors) == 2 and len(vectors[0]) > 100
    first = client.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more and first.data[0].id == batch.id
    second = client.batches.list(limit=1, after=first.data[0].id)
    assert second.data[0].id != batch.id
    files = client.files.list(purpose="batch_output", limit=2)
    assert len(files.data) == 2 and all(f.purpose == "batch_output" for f in files.data)
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=files.data[0].id, endpoint=CHAT, completion_window="48h")
    with pytest.raises(openai.BadRequestError, match="purpose batch"):
        client.batches.create(input_file_id=files.data[0].id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../etc")
