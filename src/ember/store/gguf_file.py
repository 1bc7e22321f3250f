"""Reading and checking a GGUF file's structure before llama.cpp sees it.

llama.cpp trusts the lengths and offsets in a GGUF header; a damaged or hostile file can make it read
outside the file or allocate absurd amounts of memory. This walker checks every length against the bytes
that remain before reading, every tensor's type, shape, offset and size against the file, and that tensors
neither overlap nor leave the file. It reads only the header (through mmap), so it is fast on huge files.
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ember.errors import CorruptModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_KEY_BYTES = 65_535
MAX_ARRAY_DEPTH = 4
KEPT_ARRAY_LENGTH = 64  # longer arrays (vocabularies, merges) are checked but only their length is kept

_SCALARS: dict[int, struct.Struct] = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_KNOWN_TENSOR_TYPES = {int(kind) for kind in gguf.GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFInfo:
    """What a GGUF header says: its metadata (long arrays reduced to their length) and its tensors."""

    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str) -> Any:
        """A per-architecture hyperparameter, such as `context_length` for `llama.context_length`."""
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def parameter_count(self) -> int:
        return sum(tensor.n_elements for tensor in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.tensors)

    @property
    def file_type(self) -> str:
        """Quantization of the file as llama.cpp names it (Q4_1, Q4_K_M, F16 ...)."""
        value = self.metadata.get("general.file_type")
        if isinstance(value, int):
            try:
                name = gguf.LlamaFileType(value).name
            except ValueError:
                return f"unknown ({value})"
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        types = {tensor.type_name for tensor in self.tensors}
        return types.pop() if len(types) == 1 else "mixed"

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data = data
        self.size = len(data)
        self.offset = 0
        self.path = path

    def fail(self, problem: str) -> CorruptModelError:
        return CorruptModelError(
            f"{self.path.name} is not a valid GGUF file: {problem} (at byte {self.offset} of {self.size}); "
            "the file is damaged or incomplete: download it again"
        )

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.offset + count > self.size:
            raise self.fail(f"{what} needs {count} bytes but only {self.size - self.offset} remain")

    def unpack(self, layout: struct.Struct, what: str) -> Any:
        self.need(layout.size, what)
        (value,) = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.u64(f"the length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} claims {length} bytes (at most {limit} allowed)")
        self.need(length, what)
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def read_gguf(path: str | Path) -> GGUFInfo:
    """Check a GGUF file's structure and return its header. Raises CorruptModelError, never crashes."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptModelError(f"model file {path} does not exist") from None
    except OSError as error:
        raise CorruptModelError(f"cannot read model file {path}: {error.strerror}") from None
    if not path.is_file():
        raise CorruptModelError(f"{path} is not a regular file")
    if file_size == 0:
        raise CorruptModelError(f"{path.name} is empty (0 bytes); the download or copy did not finish")
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(_Cursor(data, path), file_size)
    except OSError as error:
        raise CorruptModelError(f"cannot read model file {path}: {error.strerror or error}") from None


def _walk(cursor: _Cursor, file_size: int) -> GGUFInfo:
    cursor.need(4, "the magic number")
    magic = bytes(cursor.data[0:4])
    if magic != GGUF_MAGIC:
        raise cursor.fail(f"it starts with {magic!r}, not {GGUF_MAGIC!r}")
    cursor.offset = 4
    version = cursor.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise cursor.fail("it is a big-endian GGUF file, which llama.cpp cannot load on this machine")
        raise cursor.fail(f"version {version} is not supported (llama.cpp reads versions 2 and 3)")
    tensor_count = cursor.u64("the tensor count")
    kv_count = cursor.u64("the metadata count")
    # Each metadata pair takes at least 13 bytes and each tensor entry at least 24: a count beyond what the
    # file can hold is damage, caught here before anything is allocated for it.
    if kv_count * 13 > file_size:
        raise cursor.fail(f"it claims {kv_count} metadata entries, more than the file can hold")
    if tensor_count * 24 > file_size:
        raise cursor.fail(f"it claims {tensor_count} tensors, more than the file can hold")

    info = GGUFInfo(path=cursor.path, version=version, file_size=file_size)
    for index in range(kv_count):
        key = cursor.string(f"metadata key #{index}", MAX_KEY_BYTES)
        if key in info.metadata or key in info.array_lengths:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        value_type = cursor.u32(f"the type of {key!r}")
        value, length = _read_value(cursor, value_type, key, depth=0)
        if length is not None:
            info.array_lengths[key] = length
        if value is not None or length is None:
            info.metadata[key] = value
    if "general.architecture" not in info.metadata:
        raise cursor.fail("general.architecture is missing")

    alignment = info.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")

    pending = [_read_tensor_info(cursor, index) for index in range(tensor_count)]
    data_start = cursor.offset + (-cursor.offset % alignment)
    if data_start > file_size:
        raise cursor.fail("the file ends before its tensor data begins")
    names: set[str] = set()
    for name, type_id, shape, relative_offset in pending:
        if name in names:
            raise cursor.fail(f"tensor {name!r} appears twice")
        names.add(name)
        info.tensors.append(_check_tensor(cursor, name, type_id, shape, relative_offset, data_start, alignment))
    _check_no_overlap(cursor, info.tensors)
    return info


def _read_value(cursor: _Cursor, value_type: int, key: str, depth: int) -> tuple[Any, int | None]:
    """Read one metadata value; returns (value, array length or None). Long arrays give (None, length)."""
    scalar = _SCALARS.get(value_type)
    if scalar is not None:
        return cursor.unpack(scalar, f"the value of {key!r}"), None
    if value_type == gguf.GGUFValueType.STRING:
        return cursor.string(f"the value of {key!r}"), None
    if value_type != gguf.GGUFValueType.ARRAY:
        raise cursor.fail(f"{key!r} has unknown value type {value_type}")
    if depth >= MAX_ARRAY_DEPTH:
        raise cursor.fail(f"{key!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
    item_type = cursor.u32(f"the item type of {key!r}")
    length = cursor.u64(f"the length of {key!r}")
    item_scalar = _SCALARS.get(item_type)
    if item_scalar is not None:
        cursor.need(length * item_scalar.size, f"the {length} items of {key!r}")
        if length <= KEPT_ARRAY_LENGTH:
            items = [
                item_scalar.unpack_from(cursor.data, cursor.offset + i * item_scalar.size)[0] for i in range(length)
            ]
            cursor.offset += length * item_scalar.size
            return items, length
        cursor.offset += length * item_scalar.size
        return None, length
    minimum_item_size = 8 if item_type == gguf.GGUFValueType.STRING else 12
    if length * minimum_item_size > cursor.size - cursor.offset:
        raise cursor.fail(f"{key!r} claims {length} items, more than the file can hold")
    if item_type == gguf.GGUFValueType.STRING and length > KEPT_ARRAY_LENGTH:
        _skip_strings(cursor, length, key)
        return None, length
    items = []
    for _ in range(length):
        value, _ = _read_value(cursor, item_type, key, depth + 1)
        if length <= KEPT_ARRAY_LENGTH:
            items.append(value)
    return (items if length <= KEPT_ARRAY_LENGTH else None), length


def _skip_strings(cursor: _Cursor, count: int, key: str) -> None:
    """Step over an array of strings (a vocabulary) checking each length, without decoding them."""
    data, offset, size = cursor.data, cursor.offset, cursor.size
    unpack = _U64.unpack_from
    for _ in range(count):
        if offset + 8 > size:
            cursor.offset = offset
            raise cursor.fail(f"the items of {key!r} run past the end of the file")
        offset += 8 + unpack(data, offset)[0]
    if offset > size:
        raise cursor.fail(f"the items of {key!r} run past the end of the file")
    cursor.offset = offset


def _read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, int, tuple[int, ...], int]:
    name = cursor.string(f"the name of tensor #{index}", MAX_KEY_BYTES)
    n_dims = cursor.u32(f"the dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    shape = tuple(cursor.u64(f"dimension {axis} of {name!r}") for axis in range(n_dims))
    type_id = cursor.u32(f"the type of {name!r}")
    relative_offset = cursor.u64(f"the data offset of {name!r}")
    return name, type_id, shape, relative_offset


def _check_tensor(
    cursor: _Cursor,
    name: str,
    type_id: int,
    shape: tuple[int, ...],
    relative_offset: int,
    data_start: int,
    alignment: int,
) -> TensorInfo:
    if type_id not in _KNOWN_TENSOR_TYPES:
        raise cursor.fail(f"tensor {name!r} has unknown type {type_id}")
    tensor_type = gguf.GGMLQuantizationType(type_id)
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    if any(dim == 0 for dim in shape):
        raise cursor.fail(f"tensor {name!r} has an empty dimension {shape}")
    n_elements = math.prod(shape)
    if n_elements > cursor.size * block_size:  # cannot fit; also keeps the byte count from overflowing
        raise cursor.fail(f"tensor {name!r} claims shape {shape}, larger than the whole file")
    if shape[0] % block_size:
        raise cursor.fail(
            f"tensor {name!r} row length {shape[0]} is not a multiple of {tensor_type.name}'s block size {block_size}"
        )
    n_bytes = n_elements // block_size * type_size
    if relative_offset % alignment:
        raise cursor.fail(f"tensor {name!r} data offset {relative_offset} is not aligned to {alignment}")
    start = data_start + relative_offset
    if start + n_bytes > cursor.size:
        raise cursor.fail(
            f"tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has {cursor.size} bytes"
        )
    return TensorInfo(name, tensor_type.name, shape, start, n_bytes)


def _check_no_overlap(cursor: _Cursor, tensors: list[TensorInfo]) -> None:
    ordered = sorted(tensors, key=lambda tensor: tensor.offset)
    for previous, current in itertools.pairwise(ordered):
        if previous.offset + previous.n_bytes > current.offset:
            raise cursor.fail(f"tensors {previous.name!r} and {current.name!r} overlap")
