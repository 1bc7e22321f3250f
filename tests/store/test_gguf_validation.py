"""Damaged GGUF files give a clear CorruptModelError before llama.cpp sees them, and nothing crashes."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ember
from ember.errors import CorruptModelError
from ember.store.gguf_file import read_gguf
from tests.conftest import greedy
from tests.gguf_files import copy_with_bytes, flip_bit, tensor_info_position, write_tiny_gguf

FIRST_TENSOR = "token_embd.weight"


def _expect_refused(path: Path, fragment: str) -> None:
    with pytest.raises(CorruptModelError, match=fragment) as caught:
        ember.Model(path, num_ctx=128)
    assert path.name in str(caught.value) or str(path) in str(caught.value)
    assert caught.value.http_status == 422


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged")


def test_the_real_model_passes(model_path: Path) -> None:
    info = read_gguf(model_path)
    assert info.architecture == "llama"
    assert len(info.tensors) > 20
    assert all(t.offset + t.n_bytes <= info.file_size for t in info.tensors)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    _expect_refused(empty, "empty")


def test_a_garbage_file_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>" * 100)
    _expect_refused(garbage, "not b'GGUF'")


@pytest.mark.parametrize("keep", [3, 20, 100_000, 0.5, 0.999])
def test_a_truncated_file_is_refused(model_path: Path, tmp_path: Path, keep: float) -> None:
    size = model_path.stat().st_size
    keep_bytes = int(size * keep) if isinstance(keep, float) else keep
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as source, truncated.open("wb") as target:
        target.write(source.read(keep_bytes))
    with pytest.raises(CorruptModelError) as caught:
        ember.Model(truncated, num_ctx=128)
    assert "truncated.gguf" in str(caught.value)


@pytest.mark.parametrize(
    ("where", "replacement", "fragment"),
    [
        ("version", struct.pack("<I", 99), "version 99"),
        ("big-endian", struct.pack(">I", 3), "big-endian"),
        ("tensor count", struct.pack("<Q", 2**40), "tensors"),
        ("kv count", struct.pack("<Q", 2**40), "metadata entries"),
        ("first key length", struct.pack("<Q", 2**50), "claims"),
        ("dimensions", struct.pack("<I", 9), "dimensions"),
        ("shape", struct.pack("<Q", 2**40), "shape|larger|runs past|outside"),
        ("type", None, "unknown type"),
        ("offset", None, "offset|outside|past|overlap"),
    ],
)
def test_a_damaged_header_is_refused(
    model_path: Path, damaged_dir: Path, where: str, replacement: bytes | None, fragment: str
) -> None:
    info_at = tensor_info_position(model_path, FIRST_TENSOR)
    tensor = next(t for t in read_gguf(model_path).tensors if t.name == FIRST_TENSOR)
    n_dims = len(tensor.shape)
    positions = {
        "version": 4,
        "big-endian": 4,
        "tensor count": 8,
        "kv count": 16,
        "first key length": 24,
        "dimensions": info_at,
        "shape": info_at + 4,
        "type": info_at + 4 + 8 * n_dims,
        "offset": info_at + 8 + 8 * n_dims,
    }
    if where == "type":
        replacement = struct.pack("<I", 250)
    if where == "offset":
        replacement = struct.pack("<Q", model_path.stat().st_size)
    assert replacement is not None
    damaged = copy_with_bytes(
        model_path, damaged_dir / f"{where.replace(' ', '-')}.gguf", positions[where], replacement
    )
    try:
        _expect_refused(damaged, fragment)
    finally:
        damaged.unlink()


@pytest.mark.parametrize("bit", [0, 3, 7])
def test_single_bit_flips_in_the_tensor_table_are_refused(model_path: Path, damaged_dir: Path, bit: int) -> None:
    info_at = tensor_info_position(model_path, FIRST_TENSOR)
    damaged = flip_bit(model_path, damaged_dir / "flipped.gguf", info_at + 1 + bit // 3, bit)  # n_dims
    try:
        with pytest.raises(CorruptModelError):
            ember.Model(damaged, num_ctx=128)
    finally:
        damaged.unlink()


def test_the_same_process_still_answers_after_the_damaged_files(model: ember.Model, model_path: Path) -> None:
    result = model.generate("What is 2 + 2?", num_predict=8, **greedy())
    assert result.eval_count > 0 and result.response.strip()
    with ember.Model(model_path, num_ctx=128) as again:
        assert again.generate("Hi", num_predict=3).eval_count == 3


def test_a_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(ember.EmberError):
        ember.Model(folder)


def test_tiny_written_files_are_read(tmp_path: Path) -> None:
    info = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert info.architecture == "llama"
    assert [t.shape for t in info.tensors] == [(8, 4), (8, 8), (8, 12)]
    assert info.metadata["llama.context_length"] == 64
    assert info.array_lengths["tokenizer.ggml.tokens"] == 4


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bit_flips_give_a_clear_error_or_a_valid_reading(tmp_path: Path, data: st.DataObject) -> None:
    clean = tmp_path / "clean.gguf"
    if not clean.exists():
        write_tiny_gguf(clean)
    size = clean.stat().st_size
    damaged = tmp_path / "fuzzed.gguf"
    shutil.copyfile(clean, damaged)
    flips = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=4))
    with damaged.open("r+b") as handle:
        for position, bit in flips:
            handle.seek(position)
            value = handle.read(1)[0]
            handle.seek(position)
            handle.write(bytes([value ^ (1 << bit)]))
    try:
        info = read_gguf(damaged)
    except CorruptModelError as error:
        assert "fuzzed.gguf" in str(error)
        return
    for tensor in info.tensors:  # whatever was accepted stays inside the file
        assert tensor.offset >= 0 and tensor.offset + tensor.n_bytes <= info.file_size
