"""Small GGUF files built in tests, and ways to damage copies of real ones."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np


def write_tiny_gguf(path: Path, *, tensors: int = 3, architecture: str = "llama") -> Path:
    """A structurally valid GGUF file with a few small float tensors and typical metadata."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }}")
    for index in range(tensors):
        writer.add_tensor(f"blk.{index}.weight", np.arange(32 * (index + 1), dtype=np.float32).reshape(-1, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_info_position(path: Path, tensor_name: str) -> int:
    """Offset in the file of a tensor's info record: just after its name, where n_dims begins."""
    encoded = tensor_name.encode()
    data = path.read_bytes()[: 64 * 1024 * 1024]
    needle = struct.pack("<Q", len(encoded)) + encoded
    start = data.rfind(needle)  # the tensor table follows the metadata, so take the last match
    if start < 0:
        raise AssertionError(f"tensor {tensor_name} not found in {path}")
    return start + len(needle)


def copy_with_bytes(source: Path, target: Path, position: int, replacement: bytes) -> Path:
    shutil.copyfile(source, target)
    with target.open("r+b") as handle:
        handle.seek(position)
        handle.write(replacement)
    return target


def flip_bit(source: Path, target: Path, position: int, bit: int = 0) -> Path:
    shutil.copyfile(source, target)
    with target.open("r+b") as handle:
        handle.seek(position)
        value = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([value ^ (1 << bit)]))
    return target


# Three of SmolLM2's control tokens and FIM token names of the same length that llama.cpp recognises.
FIM_RENAMES = {
    "<jupyter_text>": "<|fim_prefix|>",
    "<jupyter_code>": "<|fim_suffix|>",
    "<empty_output>": "<|fim_middle|>",
}


def with_fim_tokens(source: Path, target: Path) -> Path:
    """A copy of the default model whose vocabulary has fill-in-the-middle tokens, as a code model's has:
    three unused control tokens renamed in place (same length, so nothing else in the file moves), which
    llama.cpp then finds by name."""
    shutil.copyfile(source, target)
    data = source.read_bytes()[: 64 * 1024 * 1024]
    with target.open("r+b") as handle:
        for old, new in FIM_RENAMES.items():
            needle = struct.pack("<Q", len(old.encode())) + old.encode()
            position = data.find(needle)
            if position < 0 or data.find(needle, position + 1) >= 0:
                raise AssertionError(f"token {old} not found once in {source}")
            handle.seek(position + 8)
            handle.write(new.encode())
    return target
