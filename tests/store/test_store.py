"""The model store: pulling files, listing, copying, removing, sharing blobs, refusing hostile input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import ember
from ember.errors import CorruptModelError, InvalidRequestError, ModelNotFoundError
from ember.store.pull import name_from_filename, pull
from ember.store.resolve import resolve_model
from ember.store.store import MODEL_MEDIA_TYPE, ModelStore, validate_digest
from tests.conftest import greedy
from tests.gguf_files import write_tiny_gguf


@pytest.fixture
def store() -> ModelStore:
    return ModelStore()  # under the test's own EMBER_HOME


def _consistent(store: ModelStore) -> None:
    """Every manifest's blobs exist, every blob is referenced, and no temp file is left."""
    referenced: set[str] = set()
    for manifest in store.list():
        for digest in manifest.digests:
            assert store.blob_path(digest).is_file(), f"{manifest.name} refers to missing {digest}"
            referenced.add(digest)
    on_disk = {path.name.replace("-", ":", 1) for path in store.blobs.glob("*")} if store.blobs.exists() else set()
    assert on_disk == referenced
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []


def test_pull_from_a_path_registers_the_file_by_digest(store: ModelStore, model_path: Path) -> None:
    result = pull(str(model_path), name="mine:v1")
    assert result.name == "mine:v1"
    blob = store.blob_path(result.digest)
    assert blob.stat().st_size == model_path.stat().st_size
    assert os.path.samefile(blob, model_path) or blob.stat().st_ino != model_path.stat().st_ino  # linked or copied
    manifest = store.require("mine:v1")
    assert manifest.model_layer.digest == result.digest
    assert json.loads(store.blob_path(manifest.config.digest).read_text())["model_family"] == "llama"
    _consistent(store)


def test_a_pulled_model_answers_through_the_api_and_by_name(store: ModelStore, model_path: Path) -> None:
    pull(str(model_path), name="pulled")
    with ember.Model("pulled", num_ctx=256) as model:
        assert model.name == "pulled:latest"
        assert model.source.digest is not None
        assert model.generate("Hi", num_predict=3, **greedy()).eval_count == 3


def test_the_default_name_comes_from_the_file_name(store: ModelStore, model_path: Path) -> None:
    assert name_from_filename("SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    result = pull(str(model_path))
    assert result.name == "smollm2-135m-instruct.q4_1:latest"


def test_pulling_the_bundled_model(store: ModelStore) -> None:
    result = pull("smollm2:135m")
    assert result.name == "smollm2:135m"
    source = resolve_model("smollm2:135m")
    assert source.license == "Apache-2.0"
    assert source.path == store.blob_path(result.digest)


def test_a_corrupt_file_is_refused_and_nothing_registered(store: ModelStore, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 100)
    with pytest.raises(CorruptModelError):
        pull(str(broken), name="broken")
    assert store.get("broken") is None
    _consistent(store)


def test_a_wrong_sha256_for_a_local_file_is_refused(store: ModelStore, model_path: Path) -> None:
    with pytest.raises(ember.EmberError, match="expected"):
        pull(str(model_path), name="checked", sha256="0" * 64)
    assert store.get("checked") is None
    _consistent(store)


def test_list_cp_and_rm(store: ModelStore, model_path: Path, tmp_path: Path) -> None:
    pull(str(model_path), name="first")
    pull(str(write_tiny_gguf(tmp_path / "tiny.gguf")), name="tiny")
    assert {str(m.name) for m in store.list()} == {"first:latest", "tiny:latest"}
    store.copy("first", "team/second:v2")
    assert store.require("team/second:v2").model_layer == store.require("first").model_layer
    assert {str(m.name) for m in store.list()} == {"first:latest", "tiny:latest", "team/second:v2"}
    store.remove("tiny")
    assert store.get("tiny") is None
    _consistent(store)
    with pytest.raises(ModelNotFoundError, match="nosuch"):
        store.remove("nosuch")
    with pytest.raises(ModelNotFoundError):
        store.copy("nosuch", "other")


def test_removing_one_of_two_models_sharing_a_blob_leaves_the_other_working(
    store: ModelStore, model_path: Path
) -> None:
    pull(str(model_path), name="one")
    pull(str(model_path), name="two")
    digest = store.require("one").model_layer.digest
    assert store.require("two").model_layer.digest == digest
    assert len(list(store.blobs.glob("sha256-*"))) == 2  # the model once, the config once
    store.remove("one")
    assert store.blob_path(digest).is_file()
    with ember.Model("two", num_ctx=256) as model:
        assert model.generate("Hello", num_predict=2).eval_count == 2
    store.remove("two")
    assert not store.blob_path(digest).exists()
    _consistent(store)


@pytest.mark.parametrize(
    "name", ["../evil", "a/../../b", "..", "/etc/passwd:latest", "x:../../y", "a/b/c/d", "name with space"]
)
def test_hostile_names_are_refused_and_nothing_is_written(
    store: ModelStore, model_path: Path, tmp_path: Path, name: str
) -> None:
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(InvalidRequestError, match="invalid model name"):
        pull(str(model_path), name=name)
    with pytest.raises(InvalidRequestError):
        store.copy("whatever", name)
    assert set(tmp_path.parent.rglob("*")) == before
    assert not store.manifests.exists() or list(store.manifests.rglob("*")) == []


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "0" * 63,
        "md5:" + "0" * 32,
        "0" * 64,
        "",
        "sha256:" + "0" * 64 + "/x",
    ],
)
def test_hostile_digests_are_refused(store: ModelStore, digest: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid digest"):
        validate_digest(digest)
    with pytest.raises(InvalidRequestError):
        store.blob_path(digest)


def test_a_manifest_pointing_outside_the_store_is_refused(store: ModelStore, model_path: Path) -> None:
    pull(str(model_path), name="victim")
    path = store.manifest_path(store.require("victim").name)
    document = json.loads(path.read_text())
    document["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    path.write_text(json.dumps(document))
    with pytest.raises(ember.EmberError, match="damaged"):
        store.require("victim")
    assert "victim:latest" not in {str(m.name) for m in store.list()}


def test_names_are_case_insensitive_and_tags_default_to_latest(store: ModelStore, model_path: Path) -> None:
    pull(str(model_path), name="MixedCase")
    assert store.get("mixedcase:latest") is not None
    assert store.require("MIXEDCASE").layer(MODEL_MEDIA_TYPE) is not None
