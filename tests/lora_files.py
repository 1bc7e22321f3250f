"""Tiny LoRA adapter GGUF files for a real base model, built with the gguf package.

llama.cpp's rules (src/llama-adapter.cpp, llama_adapter_lora_init): general.type is "adapter", adapter.type
is "lora", general.architecture equals the base model's; tensors come in pairs `<base tensor>.lora_a` and
`.lora_b`. In ggml order (ne, the reverse of numpy's shape), for a base weight of ne [n_in, n_out]:
lora_a is [n_in, rank] and lora_b is [rank, n_out]. The output of the layer becomes
W x + (alpha / rank) * B (A x), with scale 1 as ember applies adapters.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np

from ember.store.gguf_file import read_gguf


def write_tiny_lora(
    base: Path,
    target: Path,
    *,
    rank: int = 4,
    scale: float = 0.02,
    layers: Iterable[int] | None = None,
    targets: Iterable[str] = ("attn_q", "attn_v"),
    alpha: float | None = None,
    architecture: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Path:
    """A LoRA adapter GGUF for `base` (its shapes read from the base file, not hard-coded).

    `scale` is the standard deviation of lora_b's random values (0 gives B = 0: an adapter that changes
    nothing); lora_a is random with standard deviation 1/sqrt(n_in). `layers` defaults to every block,
    `targets` names the weights per block (attn_q, attn_k, attn_v, attn_output, ffn_up ...); `alpha`
    defaults to `rank` (so alpha / rank = 1). `architecture` overrides the base's (for mismatch tests) and
    `extra_tensors` adds tensors as given (for tests of llama.cpp's own checks).
    """
    info = read_gguf(base)
    shapes = {tensor.name: tensor.shape for tensor in info.tensors}
    block_count = int(info.arch_value("block_count"))
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(target), architecture or info.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    for layer in range(block_count) if layers is None else layers:
        for weight in targets:
            name = f"blk.{layer}.{weight}.weight"
            n_in, n_out = shapes[name]  # ggml order: row length first
            lora_a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
            lora_b = rng.standard_normal((n_out, rank)) * scale
            writer.add_tensor(f"{name}.lora_a", lora_a.astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", lora_b.astype(np.float32))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
