"""Hugging Face model directories in the store: `ember pull ./dir` and `ember pull hf.co/ORG/REPO` of a
repository without GGUF files, one blob per file with an index as the model layer, resolved to a tree of
links with engine "transformers"; listed, shown and removed like any model. Tiny hand-made directories:
no torch needed to store one."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import httpx
import huggingface_hub
import pytest

from ember.errors import CorruptModelError, ModelNotFoundError
from ember.store.huggingface import HFDirectory, resolve_hf_reference
from ember.store.model_directory import read_model_directory
from ember.store.pull import pull
from ember.store.resolve import TRANSFORMERS, resolve_model
from ember.store.store import MODEL_FILE_MEDIA_TYPE, MODEL_FILES_MEDIA_TYPE, ModelStore
from tests.http_server import FileServer
from tests.server import running_server

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


def safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file of zero-filled tensors: an 8-byte header length, the JSON header, the data."""
    sizes = {"F32": 4, "BF16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = sizes[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(offset)


def model_files() -> dict[str, bytes]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": safetensors({"embed.weight": ("BF16", [64, 8]), "norm.weight": ("BF16", [8])}),
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        "tokenizer_config.json": json.dumps({"chat_template": TEMPLATE}).encode(),
        "README.md": b"# a model\n",
        "pytorch_model.bin": b"not kept",
    }


def write_directory(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_a_local_directory_is_pulled_one_blob_per_file_and_resolves_to_a_tree(tmp_path: Path) -> None:
    directory = write_directory(tmp_path / "Tiny-Llama", model_files())
    facts = read_model_directory(directory)
    assert facts.parameter_count == 64 * 8 + 8 and facts.stored_dtype == "BF16" and facts.chat_template == TEMPLATE
    result = pull(f"{directory}")
    assert result.name == "tiny-llama:latest"
    layers = result.manifest.layers
    assert layers[0].media_type == MODEL_FILES_MEDIA_TYPE and result.manifest.model_layer == layers[0]
    assert [layer.media_type for layer in layers[1:]] == [MODEL_FILE_MEDIA_TYPE] * 4  # no README, no .bin
    store = ModelStore()
    index = store.read_json(layers[0])
    assert sorted(index) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert os.path.samefile(store.blob_path(index["model.safetensors"]), directory / "model.safetensors")  # linked
    assert json.loads(store.read_text(result.manifest.config))["model_format"] == "safetensors"

    source = resolve_model("tiny-llama")
    assert source.engine == TRANSFORMERS and source.digest == layers[0].digest
    assert sorted(p.name for p in source.path.iterdir()) == sorted(index)
    assert (source.path / "config.json").read_bytes() == model_files()["config.json"]
    assert resolve_model(str(directory)).engine == TRANSFORMERS  # a path works without pulling

    store.remove("tiny-llama")
    assert not source.path.exists() and not store.blob_path(index["config.json"]).exists()


def test_directories_that_are_not_models_are_refused_saying_what_is_missing(tmp_path: Path) -> None:
    files = model_files()
    del files["model.safetensors"]
    with pytest.raises(CorruptModelError, match=r"no \.safetensors weights"):
        pull(str(write_directory(tmp_path / "no-weights", files)))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        pull(str(write_directory(tmp_path / "empty", {"x.txt": b""})))
    damaged = {**model_files(), "model.safetensors": b"\xff" * 8 + b"{"}
    with pytest.raises(CorruptModelError, match="safetensors"):
        pull(str(write_directory(tmp_path / "damaged", damaged)))
    assert ModelStore().list() == []


def test_tags_and_show_tell_the_engine(tmp_path: Path) -> None:
    pull(str(write_directory(tmp_path / "tiny", model_files())))
    with running_server() as base:
        tags = httpx.get(f"{base}/api/tags").json()["models"]
        assert [(m["name"], m["details"]["format"], m["details"]["quantization_level"]) for m in tags] == [
            ("tiny:latest", "safetensors", "BF16")
        ]
        shown = httpx.post(f"{base}/api/show", json={"model": "tiny"}).json()
        assert shown["ember"]["engine"] == "transformers" and shown["template"] == TEMPLATE
        assert shown["model_info"]["llama.context_length"] == 2048


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FileServer:
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FileServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        server.add_hf_repo("someone/Tiny-Llama", model_files())
        yield server


def test_a_hub_repository_without_gguf_is_pulled_as_a_model_directory(hub: FileServer) -> None:
    resolved = resolve_hf_reference("hf.co/someone/Tiny-Llama")
    assert isinstance(resolved, HFDirectory)
    assert [file.filename for file in resolved.files] == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    result = pull("hf.co/someone/Tiny-Llama")
    assert result.name == "hf.co/someone/tiny-llama:latest"
    source = resolve_model(result.name)
    assert source.engine == TRANSFORMERS
    assert (source.path / "model.safetensors").read_bytes() == model_files()["model.safetensors"]
    assert not any(request.path.endswith("README.md") for request in hub.requests)


def test_a_hub_repository_with_gguf_files_still_pulls_the_gguf(hub: FileServer, tmp_path: Path) -> None:
    from tests.gguf_files import write_tiny_gguf

    hub.add_hf_repo(
        "someone/Both", {**model_files(), "tiny.Q4_K_M.gguf": write_tiny_gguf(tmp_path / "t.gguf").read_bytes()}
    )
    result = pull("hf.co/someone/Both")
    assert resolve_model(result.name).engine == "llama.cpp"
    with pytest.raises(ModelNotFoundError, match="no Q8_0 file"):
        pull("hf.co/someone/Both:Q8_0")
