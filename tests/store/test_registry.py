"""`ember pull NAME:TAG` from an Ollama-style registry: a local one (tests/registry.py) serving the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ember
from ember.errors import EmberError, ModelNotFoundError, PullError
from ember.store.go_template import translate_go_template
from ember.store.pull import pull
from ember.store.resolve import resolve_model
from ember.store.store import (
    ADAPTER_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MESSAGES_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PARAMS_MEDIA_TYPE,
    SYSTEM_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    ModelStore,
)
from tests.http_server import FileServer
from tests.lora_files import write_tiny_lora
from tests.registry import LocalRegistry, digest_of

# Not ChatML (the model's own template), so a prompt rendered with it is told apart by its token count.
GO_TEMPLATE = "{{ if .System }}### System:\n{{ .System }}\n\n{{ end }}### User:\n{{ .Prompt }}\n\n### Assistant:\n"
SYSTEM = "You are a counting assistant."
PARAMS = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "stop": ["### User:"], "num_ctx": 1024}


@pytest.fixture(scope="module")
def model_bytes(model_path: Path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture
def registry() -> Iterator[LocalRegistry]:
    with FileServer() as server:
        yield LocalRegistry(server)


def _publish(registry: LocalRegistry, name: str, model: bytes, **extra: object) -> dict[str, object]:
    params = {**PARAMS, "penalize_newline": True, "no_such_option": 3}  # one Ollama ignores, one ember lacks
    layers = [
        (MODEL_MEDIA_TYPE, model),
        (TEMPLATE_MEDIA_TYPE, GO_TEMPLATE.encode()),
        (SYSTEM_MEDIA_TYPE, SYSTEM.encode()),
        (PARAMS_MEDIA_TYPE, json.dumps(params).encode()),
        (LICENSE_MEDIA_TYPE, b"Apache License 2.0"),
        *extra.pop("layers", []),  # type: ignore[misc]
    ]
    return registry.publish(name, layers, **extra)  # type: ignore[arg-type]


def _nothing_registered(store: ModelStore) -> None:
    assert store.list() == []
    assert not store.blobs.exists() or list(store.blobs.iterdir()) == []
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []


def test_a_library_name_maps_every_layer_into_the_store(registry: LocalRegistry, model_bytes: bytes) -> None:
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}]
    _publish(
        registry,
        "library/smolreg:135m",
        model_bytes,
        layers=[
            (MESSAGES_MEDIA_TYPE, json.dumps(messages).encode()),
            ("application/vnd.ollama.image.draft", b"a draft model ember skips"),
        ],
    )
    notices: list[str] = []
    downloads: list[tuple[str, str | None]] = []

    def progress(description: str, digest: str | None = None) -> object:
        downloads.append((description, digest))
        from contextlib import nullcontext

        return nullcontext(lambda done, total: None)

    result = pull("smolreg:135m", registry=registry.url, progress=progress, status=notices.append)

    assert result.name == "smolreg:135m" and result.digest == digest_of(model_bytes)
    source = resolve_model("smolreg:135m")
    assert source.path.read_bytes() == model_bytes
    assert source.template == translate_go_template(GO_TEMPLATE)
    assert source.system == SYSTEM and source.license == "Apache License 2.0"
    assert dict(source.parameters) == PARAMS
    assert [dict(message) for message in source.messages] == messages
    assert any("no_such_option" in notice for notice in notices)
    assert any("draft model" in notice for notice in notices)
    # the protocol: the manifest asked for with Docker's media type, each blob by digest through the redirect
    (manifest_request,) = registry.server.requests_to("/v2/library/smolreg/manifests/135m")
    assert manifest_request.headers["Accept"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(registry.blob_requests(digest_of(model_bytes))) == 1
    assert registry.blob_requests(digest_of(b"a draft model ember skips")) == []
    assert (f"pulling {result.digest[7:19]}", result.digest) in downloads
    assert downloads[-1][1] == result.digest  # the model comes last, after the small layers
    assert list(ModelStore().partial.glob("*.partial")) == []

    # another tag with the same model file: nothing is downloaded again
    _publish(registry, "someone/smolreg:v2", model_bytes)
    assert pull("someone/smolreg:v2", registry=registry.url).name == "someone/smolreg:v2"
    assert len(registry.blob_requests(digest_of(model_bytes))) == 1


def test_pulled_with_ember_pull_it_answers_with_the_registry_template_and_parameters(
    registry: LocalRegistry, model_bytes: bytes, model: ember.Model
) -> None:
    _publish(registry, "team/counter:q4_1", model_bytes)
    env = {**os.environ, "EMBER_REGISTRY": registry.url}

    def ember_cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ember.cli.main", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)

    pulled = ember_cli("pull", "team/counter:q4_1")
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulled team/counter:q4_1 ({digest_of(model_bytes)[7:19]}, 98 MB)" in pulled.stderr
    assert "team/counter:q4_1" in ember_cli("list").stdout

    prompt = "Count from one to twenty."
    answered = ember_cli("run", "team/counter:q4_1", prompt, "--verbose")
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    rendered = f"### System:\n{SYSTEM}\n\n### User:\n{prompt}\n\n### Assistant:\n"
    expected_tokens = len(model.tokenize(rendered, parse_special=True))
    counts = {
        label.strip(): int(value.split()[0])
        for label, _, value in (line.partition(":") for line in answered.stderr.splitlines())
        if label.strip() in ("prompt eval count", "eval count")
    }
    assert counts == {"prompt eval count": expected_tokens, "eval count": 6}, answered.stderr  # num_predict 6


def test_an_interrupted_registry_pull_resumes(registry: LocalRegistry, model_bytes: bytes) -> None:
    _publish(registry, "library/resumed:1", model_bytes)
    blob = f"/cdn/{digest_of(model_bytes)}"
    registry.server.interrupt_next_after(len(model_bytes) // 3, path=blob)
    with pytest.raises(PullError, match="interrupted"):
        pull("resumed:1", registry=registry.url)
    store = ModelStore()
    assert store.list() == [] and store.get("resumed:1") is None
    partial = store.partial / f"{digest_of(model_bytes).replace(':', '-')}.partial"  # the small layers are done
    kept = partial.stat().st_size
    assert 0 < kept < len(model_bytes)

    result = pull("resumed:1", registry=registry.url)
    assert result.digest == digest_of(model_bytes)
    assert registry.server.requests_to(blob)[-1].headers["Range"] == f"bytes={kept}-"
    assert store.blob_path(result.digest).read_bytes() == model_bytes
    assert list(store.partial.glob("*.partial")) == []


def test_a_wrong_digest_is_refused_and_nothing_is_listed(registry: LocalRegistry, model_bytes: bytes) -> None:
    tampered = bytearray(model_bytes)
    tampered[len(tampered) // 2] ^= 0xFF  # same size, one byte changed: only the digest can tell
    _publish(registry, "library/tampered:1", model_bytes, served={digest_of(model_bytes): bytes(tampered)})
    with pytest.raises(PullError, match="digest"):
        pull("tampered:1", registry=registry.url)
    store = ModelStore()
    _nothing_registered(store)
    wrong = store.partial / f"{digest_of(model_bytes).replace(':', '-')}.partial"
    assert not wrong.exists()  # wrong bytes are not kept for a resume (the checked small layers are)

    _publish(registry, "library/tampered:1", model_bytes)  # the registry is fixed: the same pull now works
    assert pull("tampered:1", registry=registry.url).digest == digest_of(model_bytes)


def test_what_ember_cannot_use_is_refused_before_any_download(registry: LocalRegistry, model_bytes: bytes) -> None:
    projector = ("application/vnd.ollama.image.projector", b"a vision projector")
    _publish(registry, "library/vision:1", model_bytes, layers=[projector])
    with pytest.raises(PullError, match="vision projector"):
        pull("vision:1", registry=registry.url)
    assert registry.server.requests_to(f"/cdn/{digest_of(model_bytes)}") == []
    with pytest.raises(ModelNotFoundError, match=r"'nosuch:7b' not found in the registry"):
        pull("nosuch:7b", registry=registry.url)
    registry.server.json_routes["/v2/library/index/manifests/1"] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }
    with pytest.raises(PullError, match="not an Ollama model"):
        pull("index:1", registry=registry.url)
    _nothing_registered(ModelStore())


def test_a_template_ember_cannot_translate_leaves_the_model_file_template(
    registry: LocalRegistry, model_bytes: bytes, model_path: Path
) -> None:
    modern = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    registry.publish("library/modern:1", [(MODEL_MEDIA_TYPE, model_bytes), (TEMPLATE_MEDIA_TYPE, modern.encode())])
    pull(str(model_path), name="local")  # the store has the model file already: the registry's is not fetched
    notices: list[str] = []
    pull("modern:1", registry=registry.url, status=notices.append)
    assert resolve_model("modern:1").template is None  # so the GGUF's own chat template is used
    assert any("chat template inside the model file" in notice for notice in notices)
    assert registry.blob_requests(digest_of(model_bytes)) == []


def test_the_registry_is_asked_with_the_case_typed(
    registry: LocalRegistry, model_bytes: bytes, model_path: Path
) -> None:
    registry.publish("Team/SmolLM:Q4_K_M", [(MODEL_MEDIA_TYPE, model_bytes)])
    pull(str(model_path), name="local")  # the model file is in the store already: only the manifest is fetched
    assert pull("Team/SmolLM:Q4_K_M", registry=registry.url).name == "team/smollm:q4_k_m"  # stored in lower case
    assert len(registry.server.requests_to("/v2/Team/SmolLM/manifests/Q4_K_M")) == 1


def test_an_adapter_layer_is_kept_and_checked(
    registry: LocalRegistry, model_bytes: bytes, model_path: Path, tmp_path: Path
) -> None:
    lora = write_tiny_lora(model_path, tmp_path / "lora.gguf", layers=[0]).read_bytes()
    other = write_tiny_lora(model_path, tmp_path / "other.gguf", layers=[0], architecture="qwen2")
    registry.publish("library/tuned:1", [(MODEL_MEDIA_TYPE, model_bytes), (ADAPTER_MEDIA_TYPE, lora)])
    registry.publish("library/mismatch:1", [(MODEL_MEDIA_TYPE, model_bytes), (ADAPTER_MEDIA_TYPE, other.read_bytes())])
    pull(str(model_path), name="local")  # the model file is in the store already
    with pytest.raises(EmberError, match="for qwen2 models"):
        pull("mismatch:1", registry=registry.url)
    assert ModelStore().get("mismatch:1") is None
    (adapter,) = resolve_model(pull("tuned:1", registry=registry.url).name).adapters
    assert adapter.read_bytes() == lora


def test_a_name_with_a_host_is_pulled_from_that_host(
    registry: LocalRegistry, model_bytes: bytes, model_path: Path
) -> None:
    registry.publish("team/hosted:1", [(MODEL_MEDIA_TYPE, model_bytes)])
    host = registry.url.removeprefix("http://")
    pull(str(model_path), name="local")  # the model file is in the store already
    with pytest.raises(PullError, match="cannot reach the registry https://"):
        pull(f"{host}/team/hosted:1")  # https unless the pull says insecure, and this one speaks http
    name = pull(f"{host}/team/hosted:1", insecure=True).name  # EMBER_REGISTRY plays no part
    assert name == f"{host}/team/hosted:1" and resolve_model(name).path.read_bytes() == model_bytes
