"""Quantizing a GGUF model file with llama.cpp's own quantizer (`llama_model_quantize`).

Besides `llamacpp.py`, this is the only module that calls llama.cpp. The target is written under a temporary
name next to it and renamed into place only when llama.cpp succeeds, so a failed run leaves no file behind.
Any source type can be quantized again (allow_requantize): the bundled model is already Q4_1.

Types that llama.cpp lists but ember refuses (`REFUSED_TYPES`):
- iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m and q2_k_s need an importance matrix (imatrix), which ember
  cannot compute yet; llama.cpp stops with "this quantization requires an imatrix".
- nvfp4: llama.cpp's quantizer does not write it ("invalid output file type").
Row lengths matter too: k-quant and i-quant types need rows that are a multiple of 256 values; llama.cpp
falls back to a similar 32-value type for other tensors (all of SmolLM2-135M's, whose rows are 576 long),
and fails where no fallback exists (q1_0 on such rows). That failure is reported as a ModelLoadError.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import uuid
from pathlib import Path

import llama_cpp as lib

from ember.engine.llamacpp import check_backend, forget_llama_errors, last_llama_error, physical_cores
from ember.errors import InvalidRequestError, ModelLoadError
from ember.store.gguf_file import read_gguf

log = logging.getLogger(__name__)

_IMATRIX = "needs an importance matrix (imatrix), which ember cannot make yet"
REFUSED_TYPES: dict[str, str] = {
    **{name: _IMATRIX for name in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "q2_k_s")},
    "nvfp4": "is not a type llama.cpp's quantizer can write",
}


def _ftype_names() -> dict[str, int]:
    names: dict[str, int] = {}
    for attribute in dir(lib):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attribute.startswith(prefix):
                names[attribute.removeprefix(prefix).lower()] = int(getattr(lib, attribute))
    return names


# Lower-case type name (q4_0, q4_k_m, f16 ...) -> llama_ftype, for every type llama.cpp can quantize to here.
QUANTIZE_TYPES: dict[str, int] = {
    name: value for name, value in sorted(_ftype_names().items()) if name not in REFUSED_TYPES
}


def quantize_type(type_name: str) -> int:
    """The llama_ftype for a type name (any case); InvalidRequestError naming the valid ones otherwise."""
    key = type_name.strip().lower()
    if key in QUANTIZE_TYPES:
        return QUANTIZE_TYPES[key]
    valid = ", ".join(QUANTIZE_TYPES)
    if key in REFUSED_TYPES:
        raise InvalidRequestError(f"quantization type {key} {REFUSED_TYPES[key]}; choose one of: {valid}")
    raise InvalidRequestError(f"unknown quantization type {type_name!r}; choose one of: {valid}")


def quantize_model(source: Path, target: Path, type_name: str, *, threads: int = 0) -> None:
    """Write `source` quantized to `type_name` (q4_0, Q4_K_M, f16 ...) at `target`.

    `threads` 0 uses the physical cores. Raises InvalidRequestError for an unknown or refused type or an
    unusable target, CorruptModelError for a damaged source and ModelLoadError when llama.cpp fails.
    """
    ftype = quantize_type(type_name)
    type_name = type_name.strip().upper()
    source, target = Path(source), Path(target)
    info = read_gguf(source)  # refuse a damaged file before llama.cpp reads it
    if info.metadata.get("general.type") == "adapter":
        raise InvalidRequestError(f"{source.name} is an adapter, not a model; quantize the model it adapts")
    if target.exists() and target.resolve() == source.resolve():
        raise InvalidRequestError(f"the target {target} is the source file; write the quantized model elsewhere")
    if not target.parent.is_dir():
        raise InvalidRequestError(f"cannot write {target}: the directory {target.parent} does not exist")
    check_backend()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads if threads > 0 else physical_cores()
    params.allow_requantize = True
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    started = time.perf_counter()
    try:
        forget_llama_errors()
        status = lib.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            reason = last_llama_error("failed to quantize: ") or f"status {status}"
            raise ModelLoadError(f"llama.cpp could not quantize {source.name} to {type_name}: {reason}")
        read_gguf(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log.info("quantized %s to %s in %.1fs: %s", source.name, type_name, time.perf_counter() - started, target)
