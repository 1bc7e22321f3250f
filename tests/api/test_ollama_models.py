"""Ollama's model-management routes through the real `ollama` client: pull, list, show, create, copy, delete,
blobs, ps; and what they refuse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import ollama
import pytest

from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from tests.gguf_files import write_tiny_gguf
from tests.http_server import FileServer
from tests.server import running_server

DEFAULT_NAME = "smollm2-135m-instruct.q4_1:latest"  # the name a pull of the bundled file gets by default


def _names(client: ollama.Client) -> list[str]:
    return [model.model for model in client.list().models]


def _status(error: pytest.ExceptionInfo[ollama.ResponseError]) -> int:
    return error.value.status_code


def test_root_answers_that_ember_is_running() -> None:
    with running_server() as base:
        assert httpx.get(base + "/").text == "ember is running"
        assert httpx.head(base + "/").status_code == 200


def test_pull_list_show_copy_delete(model_path: Path) -> None:
    with running_server() as base:
        client = ollama.Client(host=base)
        lines = list(client.pull(str(model_path), stream=True))
        assert lines[0].status == "pulling manifest"
        assert lines[-1].model_dump(exclude_none=True) == {"status": "success"}  # bare: Open WebUI's "done"
        assert _names(client) == [DEFAULT_NAME]
        listed = client.list().models[0]
        assert listed.details.family == "llama" and listed.details.quantization_level == "Q4_1"
        assert listed.size > 90_000_000

        shown = client.show(DEFAULT_NAME)
        assert shown.details.quantization_level == "Q4_1" and shown.modelinfo["general.architecture"] == "llama"

        # stream false: one object; ember's `destination` names the model
        answer = httpx.post(
            base + "/api/pull", json={"model": str(model_path), "destination": "mine:v1", "stream": False}
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.json() == {"status": "success"} and ModelStore().get("mine:v1") is not None

        assert client.copy("mine:v1", "copied").status == "success"
        assert set(_names(client)) == {DEFAULT_NAME, "mine:v1", "copied:latest"}
        assert client.delete("copied").status == "success"
        assert client.delete("mine:v1").status == "success"
        assert _names(client) == [DEFAULT_NAME]
        with pytest.raises(ollama.ResponseError) as gone:
            client.delete("mine:v1")
        assert _status(gone) == 404 and "not found" in gone.value.error
        with pytest.raises(ollama.ResponseError) as missing:
            client.copy("nosuch", "other")
        assert _status(missing) == 404
        with pytest.raises(ollama.ResponseError) as unknown:
            client.show("nosuch")
        assert _status(unknown) == 404


def test_pull_streams_download_progress_from_a_url(tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    with FileServer() as files, running_server() as base:
        files.files["/models/tiny.Q8_0.gguf"] = data
        lines = list(ollama.Client(host=base).pull(files.url("/models/tiny.Q8_0.gguf"), stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    downloads = [line for line in lines if line.completed is not None]
    assert downloads and downloads[-1].completed == downloads[-1].total == len(data)
    assert [str(manifest.name) for manifest in ModelStore().list()] == ["tiny.q8_0:latest"]


def test_pull_errors_have_statuses(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    with running_server() as base:
        client = ollama.Client(host=base)
        with pytest.raises(ollama.ResponseError) as unknown:
            client.pull("llama3.2")  # the tests' registry (EMBER_REGISTRY) has no models
        assert _status(unknown) == 404 and "'llama3.2:latest' not found in the registry" in unknown.value.error
        with pytest.raises(ollama.ResponseError) as damaged:
            list(client.pull(str(garbage), stream=True))  # an early error is a status, even when streaming
        assert _status(damaged) == 422
        relative = httpx.post(base + "/api/pull", json={"model": "./garbage.gguf"})
        assert relative.status_code == 400 and "absolute path" in relative.json()["error"]
        bad_name = httpx.post(base + "/api/pull", json={"model": str(garbage), "destination": "../x"})
        assert bad_name.status_code == 400 and "invalid model name" in bad_name.json()["error"]
        assert httpx.post(base + "/api/pull", json={}).status_code == 400
        assert client.list().models == []


def test_create_from_a_model_with_system_parameters_and_messages() -> None:
    with running_server() as base:
        client = ollama.Client(host=base)
        lines = list(
            client.create(
                model="pirate",
                from_="smollm2",
                system="You are a pirate named Redbeard.",
                parameters={"temperature": 0, "num_predict": 6, "stop": ["<|im_end|>", "Arr"]},
                messages=[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Redbeard."}],
                license="MIT",
                stream=True,
            )
        )
        assert lines[-1].status == "success" and any(line.status.startswith("using layer") for line in lines)
        source = resolve_model("pirate")
        assert source.system == "You are a pirate named Redbeard."
        assert source.parameters == {"temperature": 0.0, "num_predict": 6, "stop": ["<|im_end|>", "Arr"]}
        assert [m["content"] for m in source.messages] == ["Who are you?", "Redbeard."]
        assert "MIT" in (source.license or "")

        shown = client.show("pirate")
        assert "temperature" in shown.parameters and "SYSTEM You are a pirate named Redbeard." in shown.modelfile

        answer = client.generate(model="pirate", prompt="Hello", keep_alive=-1)
        assert answer.done and answer.eval_count <= 6
        assert [model.model for model in client.ps().models] == ["pirate:latest"]

        # stream false answers once; the older {modelfile} form works too
        legacy = httpx.post(
            base + "/api/create",
            json={"model": "legacy", "modelfile": "FROM pirate\nSYSTEM Be brief.\n", "stream": False},
        )
        assert legacy.status_code == 200 and legacy.json()["status"] == "success"
        assert resolve_model("legacy").system == "Be brief."
        assert resolve_model("legacy").parameters["num_predict"] == 6  # inherited from pirate


def test_create_refuses_bad_requests_with_statuses(tmp_path: Path) -> None:
    with running_server() as base:

        def create(**body: object) -> httpx.Response:
            return httpx.post(base + "/api/create", json={"model": "x", **body})

        unknown = create(**{"from": "nosuch"})
        assert unknown.status_code == 404, unknown.text
        parameter = create(**{"from": "smollm2", "parameters": {"temprature": 0.5}})
        assert parameter.status_code == 400 and "did you mean temperature" in parameter.json()["error"]
        assert "Modelfile line" not in parameter.json()["error"]
        assert create().status_code == 400  # neither from nor files
        assert create(**{"from": "./model.gguf"}).status_code == 400  # relative to what?
        assert create(**{"modelfile": "FROM ./model.gguf\n"}).status_code == 400
        assert create(**{"modelfile": "FROM smollm2\nPARAMETER temperature hot\n"}).status_code == 400
        missing_blob = create(files={"m.gguf": "sha256:" + "0" * 64})
        assert missing_blob.status_code == 400 and "upload" in missing_blob.json()["error"]
        assert create(files={"m.gguf": "../../etc/passwd"}).status_code == 400
        assert httpx.post(base + "/api/create", json={"model": "../up", "from": "smollm2"}).status_code == 400

        # a relative path in the older form is relative to the Modelfile's `path`
        write_tiny_gguf(tmp_path / "tiny.gguf")
        relative = create(modelfile="FROM ./tiny.gguf\n", path=str(tmp_path / "Modelfile"), stream=False)
        assert relative.status_code == 200, relative.text
        assert ModelStore().list()[0].model_layer.size == (tmp_path / "tiny.gguf").stat().st_size


def test_create_from_an_uploaded_blob(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    with running_server() as base:
        client = ollama.Client(host=base)
        digest = "sha256:" + hashlib.sha256(tiny.read_bytes()).hexdigest()
        assert httpx.head(f"{base}/api/blobs/{digest}").status_code == 404
        assert httpx.post(f"{base}/api/blobs/{digest}", content=tiny.read_bytes()).status_code == 201
        assert client.create_blob(tiny) == digest  # there already: 200
        assert httpx.head(f"{base}/api/blobs/{digest}").status_code == 200
        assert httpx.head(f"{base}/api/blobs/sha256-{digest[7:]}").status_code == 200  # Ollama's file-name form

        assert client.create(model="tiny", files={"tiny.gguf": digest}).status == "success"
        manifest = ModelStore().get("tiny")
        assert manifest is not None and manifest.model_layer.digest == digest
        # the older form refers to a blob as `FROM @sha256:...`
        legacy = httpx.post(base + "/api/create", json={"model": "tiny2", "modelfile": f"FROM @{digest}\n"})
        assert legacy.status_code == 200 and json.loads(legacy.text.splitlines()[-1])["status"] == "success"
        assert ModelStore().get("tiny2").model_layer.digest == digest


def test_blob_uploads_are_checked_and_not_limited_in_size(model_path: Path) -> None:
    with running_server(max_request_bytes=1024 * 1024) as base:
        wrong = "sha256:" + "1" * 64
        refused = httpx.post(f"{base}/api/blobs/{wrong}", content=b"hello")
        assert refused.status_code == 400 and "digest mismatch" in refused.json()["error"]
        assert httpx.head(f"{base}/api/blobs/{wrong}").status_code == 404
        assert list(ModelStore().tmp.iterdir()) == []  # the rejected upload left nothing behind

        for bad in ("bad", "sha256:123", "sha512:" + "0" * 64, "sha256:" + "g" * 64, "..%2F..%2Fetc%2Fpasswd"):
            assert httpx.head(f"{base}/api/blobs/{bad}").status_code in (400, 404), bad
            assert httpx.post(f"{base}/api/blobs/{bad}", content=b"x").status_code in (400, 404), bad

        # a model file is far larger than the request limit; it streams to disk all the same
        digest = ollama.Client(host=base).create_blob(model_path)
        assert ModelStore().blob_path(digest).stat().st_size == model_path.stat().st_size
        too_large = httpx.post(f"{base}/api/show", content=b" " * (2 * 1024 * 1024))
        assert too_large.status_code == 413  # other routes keep the limit
