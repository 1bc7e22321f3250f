"""How much memory a model needs, how much the machine has, and how to split a model between GPU and CPU.

The model manager asks three questions before loading: does this model fit next to the ones already loaded
(`estimate_model`, `memory_budget`, `fits`), how many layers go on the GPU (`plan_gpu_layers`), and what to
try next when llama.cpp still runs out of memory (`fallback_ladder`). Estimates come from the GGUF header
alone, so they are cheap and need no llama.cpp; they aim a little high, since guessing low means a failed
load (or the OOM killer) while guessing high only means one model fewer kept loaded.

GPU memory is read through NVML, which ember does not depend on: `pip install nvidia-ml-py` enables it.
Without it every machine looks GPU-less to the planner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.options import LoadOptions
from ember.store.gguf_file import GGUFInfo

log = logging.getLogger(__name__)

KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16
MAX_UBATCH = 512  # the engine passes n_ubatch = min(num_batch, 512); compute buffers scale with the ubatch
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_CGROUP_FILES = (  # (limit, usage, reclaimable-key in memory.stat) for cgroup v2, then v1
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
)


@dataclass(frozen=True)
class MemoryInfo:
    total: int  # bytes; 0 when the platform cannot tell
    available: int  # bytes that can be allocated without swapping (includes reclaimable page cache)


def system_memory() -> MemoryInfo:
    """RAM of this machine, capped by a container's cgroup limit (/proc/meminfo shows the host's RAM)."""
    try:
        memory = _read_meminfo(Path("/proc/meminfo"))
    except (OSError, ValueError, KeyError):
        memory = _sysconf_memory()
    return _cgroup_capped(memory, Path("/sys/fs/cgroup"))


def _read_meminfo(path: Path) -> MemoryInfo:
    fields = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemAvailable" not in fields:  # kernels before 3.14
        fields["MemAvailable"] = fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return MemoryInfo(total=fields["MemTotal"], available=fields["MemAvailable"])


def _sysconf_memory() -> MemoryInfo:
    try:
        page, total = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        log.debug("cannot read the size of RAM on this platform")
        return MemoryInfo(total=0, available=0)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES: the best guess left is all of it
        available = total
    return MemoryInfo(total=total, available=available)


def _cgroup_capped(memory: MemoryInfo, root: Path) -> MemoryInfo:
    for limit_file, usage_file, stat_file, reclaimable_key in _CGROUP_FILES:
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max":
                return memory
            limit, usage = int(limit_text), int((root / usage_file).read_text())
            stat = dict(line.split() for line in (root / stat_file).read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            continue
        free = limit - usage + int(stat.get(reclaimable_key, 0))  # inactive page cache is reclaimable
        return MemoryInfo(total=min(memory.total, limit), available=max(0, min(memory.available, free)))
    return memory


@dataclass(frozen=True)
class GpuDevice:
    index: int  # as CUDA numbers it for this process (after CUDA_VISIBLE_DEVICES), which llama.cpp's main_gpu uses
    name: str
    total: int
    free: int


def gpu_devices() -> list[GpuDevice]:
    """NVIDIA GPUs with their free memory, or [] when NVML is missing or fails: never raises.

    Only devices named in CUDA_VISIBLE_DEVICES are listed, numbered as CUDA numbers them, since those are the
    only ones llama.cpp can use. NVML sees no AMD or Apple GPU: the plan is then "no GPU".
    """
    try:
        import pynvml  # type: ignore[import-not-found]
    except Exception as error:  # ImportError, or a broken install
        log.debug("NVML unavailable (%s); pip install nvidia-ml-py to detect NVIDIA GPUs", error)
        return []
    try:
        pynvml.nvmlInit()
    except Exception as error:
        log.debug("NVML did not start (%s); assuming no GPU", error)
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append((_text(pynvml.nvmlDeviceGetUUID(handle)), _text(pynvml.nvmlDeviceGetName(handle)), memory))
    except Exception as error:
        log.debug("NVML failed while listing GPUs (%s); assuming no GPU", error)
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = range(len(found)) if visible is None else _visible_order(visible, [uuid for uuid, _, _ in found])
    return [
        GpuDevice(index=cuda_index, name=found[i][1], total=int(found[i][2].total), free=int(found[i][2].free))
        for cuda_index, i in enumerate(order)
    ]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _visible_order(visible: str, uuids: list[str]) -> list[int]:
    """NVML indexes of the devices CUDA_VISIBLE_DEVICES names, in its order; CUDA stops at the first bad entry."""
    order: list[int] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit() and int(entry) < len(uuids):
            match = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            match = matches[0]
        if match in order:
            break
        order.append(match)
    return order


@dataclass(frozen=True)
class ModelEstimate:
    """Bytes a model needs once loaded. Weights count fully even when mmap'd: their pages are page cache, which
    the kernel may evict, but a model evicted while in use reads itself back from disk at every token.

    `compute` is llama.cpp's scratch buffer for one ubatch (u = min(num_batch, 512)) in f32: activations
    4·u·(4·n_embd + 2·n_ff) (hidden state, q/k/v, feed-forward) plus the larger (the graph allocator reuses
    one's memory for the other) of the attention scores 4·u·n_kv·(n_head + 1) (KQ and its mask; flash attention
    tiles the scores, leaving the mask) and the logits 4·u·(n_vocab + n_embd). Against llama.cpp's own report
    for SmolLM2-135M: 107 vs 99 MiB at num_ctx 4096, 331 vs 326 MiB at 16384, 13.5 vs 12.4 MiB at num_batch 64.
    """

    weights: int  # all tensors
    per_layer: tuple[int, ...]  # weights of each repeating block blk.N, N < n_layer
    non_repeating: int  # token_embd, output, output_norm ... (per_layer + non_repeating == weights)
    kv_cache: int  # num_ctx · num_parallel tokens, all layers, K and V in f16
    kv_per_layer: int  # kv_cache / n_layer rounded up (layers may differ in KV heads)
    compute: int
    output: int = 0  # what offloading the output layer puts on the GPU (a copy of token_embd when tied)
    output_moved: int = 0  # the part of `output` that then leaves the CPU (0 of a tied token_embd)

    @property
    def n_layer(self) -> int:
        return len(self.per_layer)

    def total(self) -> int:
        """Everything on the CPU: what a CPU-only load takes."""
        return self.weights + self.kv_cache + self.compute

    def _offloaded(self, layers: int) -> tuple[int, int, bool]:
        """(block weights, KV) of the last `layers` blocks, which llama.cpp offloads, and whether output goes."""
        blocks = max(0, min(layers, self.n_layer))
        weights = sum(self.per_layer[self.n_layer - blocks :])
        return weights, min(self.kv_per_layer * blocks, self.kv_cache), layers > self.n_layer

    def on_gpu(self, layers: int) -> int:
        """Bytes on the GPU with `layers` offloaded; n_layer + 1 adds the output layer, as in llama.cpp."""
        if layers <= 0:
            return 0
        weights, kv, output = self._offloaded(layers)
        return weights + kv + (self.output if output else 0) + self.compute

    def on_cpu(self, layers_on_gpu: int) -> int:
        """Bytes left in RAM. The CPU keeps its compute buffer (input embedding, the layers it still runs)."""
        weights, kv, output = self._offloaded(layers_on_gpu)
        return self.total() - weights - kv - (self.output_moved if output else 0)


def _int(value: Any, default: int) -> int:
    """A positive int from metadata (an array gives its largest item), else `default`."""
    if isinstance(value, list):
        value = max((item for item in value if isinstance(item, int | float)), default=None)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else default


def _per_layer_ints(value: Any, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list) and len(value) == n_layer and all(isinstance(item, int) for item in value):
        return [int(item) for item in value]  # may hold 0: layers without attention (hybrid models)
    return [_int(value, default)] * n_layer


def estimate_model(info: GGUFInfo, options: LoadOptions) -> ModelEstimate:
    """Estimate a model's memory from its GGUF header. Missing hyperparameters fall back rather than fail:
    without block_count every tensor counts as non-repeating (and there is no KV cache to count)."""
    tensors = {tensor.name: tensor.n_bytes for tensor in info.tensors}
    token_embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    n_layer = _int(info.arch_value("block_count"), 0)
    n_embd = _int(info.arch_value("embedding_length"), token_embd.shape[0] if token_embd else 0)
    n_vocab = _int(info.arch_value("vocab_size"), info.array_lengths.get("tokenizer.ggml.tokens", 0))
    n_vocab = n_vocab or (token_embd.shape[-1] if token_embd and len(token_embd.shape) > 1 else 0)
    n_ff = _int(info.arch_value("feed_forward_length"), 4 * n_embd)

    per_layer = [0] * n_layer
    for name, n_bytes in tensors.items():
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < n_layer:
            per_layer[int(match.group(1))] += n_bytes
    weights = sum(tensors.values())

    heads = _per_layer_ints(info.arch_value("attention.head_count"), n_layer, 0)
    n_head = next((head for head in heads if head), 0)  # llama.cpp derives head sizes from the first layer
    kv_value = info.arch_value("attention.head_count_kv")  # absent: as many KV heads as query heads
    kv_heads = heads if kv_value is None else _per_layer_ints(kv_value, n_layer, n_head)
    head_k = _int(info.arch_value("attention.key_length"), n_embd // n_head if n_head else 0)
    head_v = _int(info.arch_value("attention.value_length"), n_embd // n_head if n_head else 0)
    n_kv = options.num_ctx * options.num_parallel
    # Without head counts assume full multi-head attention: the largest cache a layer of this width can have.
    per_token = sum((head_k + head_v) * kv for kv in kv_heads) if n_head else 2 * n_embd * n_layer
    kv_cache = n_kv * per_token * KV_BYTES_PER_ELEMENT

    ubatch = min(options.num_batch, MAX_UBATCH)
    attention = 4 * ubatch * n_kv * (1 if options.flash_attn else n_head + 1)
    logits = 4 * ubatch * (n_vocab + n_embd)
    compute = 4 * ubatch * (4 * n_embd + 2 * n_ff) + max(attention, logits)

    output_moved = sum(n for name, n in tensors.items() if name.startswith(("output.", "output_norm.")))
    tied = "output.weight" not in tensors  # llama.cpp then puts a copy of token_embd on the GPU as the output
    return ModelEstimate(
        weights=weights,
        per_layer=tuple(per_layer),
        non_repeating=weights - sum(per_layer),
        kv_cache=kv_cache,
        kv_per_layer=-(-kv_cache // n_layer) if n_layer else 0,
        compute=compute,
        output=output_moved + (tensors.get("token_embd.weight", 0) if tied else 0),
        output_moved=output_moved,
    )


def memory_budget(*, reserve: int = 1 << 30, fraction: float = 0.9, memory: MemoryInfo | None = None) -> int:
    """Bytes of RAM ember may fill with models: a fraction of what is available, less a reserve for the rest
    of the system (and ember itself), so loading a model never pushes the machine into swap."""
    memory = memory if memory is not None else system_memory()
    return max(0, int(memory.available * fraction) - reserve)


def fits(estimate: ModelEstimate, budget: int, layers_on_gpu: int = 0) -> bool:
    """Whether the model's CPU side fits in `budget` bytes with `layers_on_gpu` layers offloaded."""
    return estimate.on_cpu(layers_on_gpu) <= budget


@dataclass(frozen=True)
class GpuPlan:
    layers: int  # llama.cpp's n_gpu_layers: n_layer + 1 offloads the output layer too
    device: int | None  # GPU for main_gpu; None when no layer goes to a known GPU
    reason: str


def plan_gpu_layers(
    estimate: ModelEstimate,
    devices: Sequence[GpuDevice],
    *,
    n_layer: int,
    requested: int = -1,
    reserve: int = 512 << 20,
) -> GpuPlan:
    """How many layers to offload: as many as fit in the free VRAM (less `reserve`, for the CUDA context and
    fragmentation) of the GPU with the most free memory. A request (num_gpu >= 0) is honoured as is."""
    best = max(devices, key=lambda device: device.free, default=None)
    if requested >= 0:
        layers = min(requested, n_layer + 1)
        return GpuPlan(layers, best.index if best is not None and layers else None, "requested")
    if best is None:
        return GpuPlan(0, None, "no GPU")
    room = best.free - reserve
    layers = next((n for n in range(n_layer + 1, 0, -1) if estimate.on_gpu(n) <= room), 0)
    where = f"{format_bytes(best.free)} free on GPU {best.index} ({best.name}) less {format_bytes(reserve)} reserve"
    need = f"all would need {format_bytes(estimate.on_gpu(n_layer + 1))}"
    if layers == 0:
        return GpuPlan(0, None, f"no layer fits in {where}; one needs {format_bytes(estimate.on_gpu(1))}")
    if layers > n_layer:
        need = f"they need {format_bytes(estimate.on_gpu(layers))}"
    return GpuPlan(layers, best.index, f"{layers}/{n_layer + 1} layers fit in {where}; {need}")


def fallback_ladder(options: LoadOptions, plan: GpuPlan, *, min_ctx: int = 2048) -> list[tuple[LoadOptions, str]]:
    """Load attempts in order, each cheaper than the last, for when llama.cpp runs out of memory: the plan,
    half the GPU layers at a time, CPU only, then CPU only with num_ctx halved down to `min_ctx`.

    GPU steps come first because VRAM is what estimates most often get wrong (other processes, drivers);
    num_ctx goes last because it changes what the user can do with the model, not only how fast it runs.
    """
    steps: list[tuple[LoadOptions, str]] = []

    def add(update: dict[str, Any], description: str) -> None:
        candidate = options.model_copy(update=update)
        if all(candidate != seen for seen, _ in steps):
            steps.append((candidate, description))

    gpu, on = ({"main_gpu": plan.device}, f" on GPU {plan.device}") if plan.device is not None else ({}, "")
    layers = plan.layers
    while layers > 0:
        add({"num_gpu": layers, **gpu}, f"{layers} layer{'s' if layers > 1 else ''}{on}")
        layers //= 2
    add({"num_gpu": 0}, "CPU only")
    num_ctx = options.num_ctx
    while num_ctx > min_ctx:
        num_ctx = max(num_ctx // 2, min_ctx)
        add({"num_gpu": 0, "num_ctx": num_ctx}, f"CPU only, num_ctx {num_ctx}")
    return steps


def format_bytes(n: int) -> str:
    """Binary units, two or three significant digits for logs and messages: "512 B", "98 MiB", "1.5 GiB"."""
    value, sign = float(abs(n)), "-" if n < 0 else ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.1f} {unit}" if value < 10 else f"{sign}{value:.0f} {unit}"
