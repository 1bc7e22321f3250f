"""What a Hugging Face model directory holds, read without torch or transformers: its config, its weights'
headers (safetensors), its chat template. `ember pull ./dir`, `ember show`, /api/tags and the memory estimate
read it; a directory that is not a loadable model is refused here with what is missing.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import CorruptModelError, ModelNotFoundError

# What a model directory needs at run time. Other files (README, PyTorch .bin copies of the weights, ONNX or
# GGUF exports, remote code) are left out of the store: remote code is never run (no trust_remote_code).
KEPT_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is damaged


@dataclass(frozen=True)
class ModelDirectory:
    path: Path
    config: dict[str, Any]
    files: tuple[str, ...]  # the kept files, relative to `path`, sorted
    parameter_count: int
    weights_bytes: int  # the safetensors files' tensor bytes, in their stored dtypes
    stored_dtype: str  # the dtype most of the weights are stored in (F32, BF16 ...)
    chat_template: str | None

    @property
    def architecture(self) -> str:
        return str(self.config.get("model_type") or (self.config.get("architectures") or ["unknown"])[0])

    @property
    def context_length(self) -> int | None:
        value = self.config.get("max_position_embeddings") or self.config.get("n_positions")
        return int(value) if isinstance(value, int) else None

    def weights_bytes_as(self, dtype: str | None) -> int:
        """The weights' size once loaded as `dtype` (torch's name: float16 ...); as stored when None or auto."""
        wanted = _TORCH_DTYPE_BYTES.get(dtype or "")
        return self.parameter_count * wanted if wanted else self.weights_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers (full attention assumed)."""
        config = self.config.get("text_config") or self.config
        layers = int(config.get("num_hidden_layers") or 0)
        heads = int(config.get("num_attention_heads") or 0)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        hidden = int(config.get("hidden_size") or 0)
        head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
        return 2 * layers * kv_heads * head_dim * dtype_bytes


def is_model_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def kept_files(path: Path) -> list[str]:
    """The files of a model directory the store keeps, relative, sorted; hidden files and folders left out."""
    names = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        if file.name.lower().endswith(KEPT_SUFFIXES):
            names.append(relative.as_posix())
    return names


def read_model_directory(path: Path) -> ModelDirectory:
    """Check a directory as a transformers model: config.json with an architecture, safetensors weights whose
    headers read, a tokenizer. Raises ModelNotFoundError or CorruptModelError naming what is wrong."""
    if not path.is_dir():
        raise ModelNotFoundError(f"no model directory at {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorruptModelError(f"{config_path} is not readable JSON: {error}") from None
    if not isinstance(config, dict) or not (config.get("architectures") or config.get("model_type")):
        raise CorruptModelError(f"{config_path} names no architecture (architectures or model_type)")
    files = kept_files(path)
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights:
        raise CorruptModelError(
            f"{path} has no .safetensors weights; ember's transformers engine loads safetensors only "
            "(convert PyTorch .bin weights with save_pretrained(safe_serialization=True))"
        )
    if not any(name.rsplit("/", 1)[-1].startswith("tokenizer") for name in files):
        raise CorruptModelError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    count = size = 0
    by_dtype: dict[str, int] = {}
    for name in weights:
        for dtype, shape in _safetensors_tensors(path / name):
            n = math.prod(shape)
            count += n
            size += n * _DTYPE_BYTES.get(dtype, 4)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    return ModelDirectory(
        path=path,
        config=config,
        files=tuple(files),
        parameter_count=count,
        weights_bytes=size,
        stored_dtype=max(by_dtype, key=lambda dtype: by_dtype[dtype]) if by_dtype else "unknown",
        chat_template=_chat_template(path),
    )


def _safetensors_tensors(path: Path) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of each tensor in a safetensors file, from its header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as reader:
            prefix = reader.read(8)
            if len(prefix) != 8:
                raise CorruptModelError(f"{path.name} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise CorruptModelError(f"{path.name} has a damaged safetensors header ({length} bytes)")
            header = json.loads(reader.read(length))
    except (OSError, ValueError) as error:
        raise CorruptModelError(f"{path.name} is not a readable safetensors file: {error}") from None
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise CorruptModelError(f"{path.name}: tensor {name!r} has no shape in the safetensors header")
        tensors.append((str(entry.get("dtype")), [int(dim) for dim in entry["shape"]]))
    return tensors


def _chat_template(path: Path) -> str | None:
    """The directory's chat template: chat_template.jinja (transformers 4.43+), else tokenizer_config.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((item.get("template") for item in template if item.get("name") == "default"), None)
    return template if isinstance(template, str) else None
