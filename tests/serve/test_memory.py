"""Memory estimates, the RAM budget, the GPU offload plan and the out-of-memory fallback ladder.

The machine running these has no GPU: every GPU case uses fake GpuDevice numbers or a fake NVML module.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from ember.options import LoadOptions
from ember.serve import memory
from ember.serve.memory import (
    GpuDevice,
    GpuPlan,
    MemoryInfo,
    ModelEstimate,
    estimate_model,
    fallback_ladder,
    fits,
    format_bytes,
    gpu_devices,
    memory_budget,
    plan_gpu_layers,
    system_memory,
)
from ember.store.bundled import DEFAULT_MODEL
from ember.store.gguf_file import GGUFInfo, read_gguf
from tests.gguf_files import write_tiny_gguf

GiB, MiB = 1 << 30, 1 << 20
N_LAYER = 30


@pytest.fixture(scope="module")
def smollm2() -> GGUFInfo:
    return read_gguf(DEFAULT_MODEL.locate())


@pytest.fixture(scope="module")
def estimate(smollm2: GGUFInfo) -> ModelEstimate:
    return estimate_model(smollm2, LoadOptions(num_ctx=4096))


def write_gguf(path: Path, metadata: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> GGUFInfo:
    """A GGUF file with exactly this metadata (keys under "llama.": "attention.head_count" ...) and f32 tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf(path)


# --- estimates of the real default model ---------------------------------------------------------------


def test_weights_are_the_files_tensor_bytes(smollm2: GGUFInfo, estimate: ModelEstimate) -> None:
    assert estimate.weights == smollm2.tensor_bytes
    assert len(estimate.per_layer) == N_LAYER
    assert sum(estimate.per_layer) + estimate.non_repeating == estimate.weights
    assert len(set(estimate.per_layer)) == 1  # every block of SmolLM2 has the same tensors
    by_name = {tensor.name: tensor.n_bytes for tensor in smollm2.tensors}
    assert estimate.non_repeating == by_name["token_embd.weight"] + by_name["output_norm.weight"]


def test_kv_cache_is_exact_and_scales_with_num_parallel(smollm2: GGUFInfo, estimate: ModelEstimate) -> None:
    # 3 KV heads x head dim 64 = 192 for K and as much for V, f16
    assert estimate.kv_cache == 4096 * N_LAYER * (192 + 192) * 2 == 90 * MiB  # llama.cpp reports 90.00 MiB
    assert estimate.kv_per_layer * N_LAYER == estimate.kv_cache
    parallel = estimate_model(smollm2, LoadOptions(num_ctx=4096, num_parallel=4))
    assert parallel.kv_cache == 4 * estimate.kv_cache
    assert estimate_model(smollm2, LoadOptions(num_ctx=2048)).kv_cache == estimate.kv_cache // 2


def test_compute_buffer_is_close_to_llama_cpps_own_and_follows_its_inputs(smollm2: GGUFInfo) -> None:
    measured = {(4096, 512): 99.38, (16384, 512): 326.38, (4096, 64): 12.42}  # MiB, llama.cpp's log, CPU
    for (num_ctx, num_batch), mib in measured.items():
        compute = estimate_model(smollm2, LoadOptions(num_ctx=num_ctx, num_batch=num_batch)).compute / MiB
        assert mib <= compute <= mib * 1.15, (num_ctx, num_batch, compute)
    # the ubatch is capped at 512, so a larger num_batch costs no more scratch memory
    big_batch = estimate_model(smollm2, LoadOptions(num_batch=2048))
    assert big_batch.compute == estimate_model(smollm2, LoadOptions(num_batch=512)).compute
    # flash attention drops the KQ score matrix, which dominates at long contexts
    long_fa = estimate_model(smollm2, LoadOptions(num_ctx=16384, flash_attn=True))
    assert long_fa.compute < estimate_model(smollm2, LoadOptions(num_ctx=16384)).compute / 2


def test_gpu_and_cpu_split(smollm2: GGUFInfo, estimate: ModelEstimate) -> None:
    token_embd = next(t.n_bytes for t in smollm2.tensors if t.name == "token_embd.weight")
    output_norm = next(t.n_bytes for t in smollm2.tensors if t.name == "output_norm.weight")
    assert estimate.total() == estimate.weights + estimate.kv_cache + estimate.compute
    assert estimate.on_gpu(0) == 0 and estimate.on_gpu(-1) == 0
    assert estimate.on_cpu(0) == estimate.total()
    assert estimate.on_gpu(1) == estimate.per_layer[-1] + estimate.kv_per_layer + estimate.compute
    needs = [estimate.on_gpu(n) for n in range(N_LAYER + 2)]
    assert needs == sorted(needs)
    assert estimate.on_gpu(N_LAYER) == sum(estimate.per_layer) + estimate.kv_cache + estimate.compute
    # SmolLM2 ties its output to token_embd: offloading the output puts a copy on the GPU, the CPU keeps its own
    assert estimate.on_gpu(N_LAYER + 1) - estimate.on_gpu(N_LAYER) == token_embd + output_norm
    assert estimate.on_cpu(N_LAYER) - estimate.on_cpu(N_LAYER + 1) == output_norm
    assert estimate.on_cpu(N_LAYER + 1) == token_embd + estimate.compute  # token_embd is the input layer
    assert estimate.on_gpu(500) == estimate.on_gpu(N_LAYER + 1)


def test_fits(estimate: ModelEstimate) -> None:
    assert fits(estimate, estimate.total())
    assert not fits(estimate, estimate.total() - 1)
    assert fits(estimate, estimate.total() - 1, layers_on_gpu=1)


# --- synthetic files: fallbacks for missing or unusual metadata ------------------------------------------


def test_tiny_file_without_head_counts_assumes_full_attention(tmp_path: Path) -> None:
    info = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))  # block_count 1, n_embd 8, tensors blk.0..2
    result = estimate_model(info, LoadOptions(num_ctx=64))
    assert result.weights == info.tensor_bytes == 4 * (32 + 64 + 96)
    assert result.per_layer == (4 * 32,)  # blk.1 and blk.2 lie beyond block_count: non-repeating
    assert result.non_repeating == 4 * (64 + 96)
    assert result.kv_cache == 64 * 1 * (8 + 8) * 2
    assert result.compute > 0


def test_missing_block_count_makes_everything_non_repeating(tmp_path: Path) -> None:
    info = write_gguf(
        tmp_path / "flat.gguf", {"embedding_length": 8}, {"token_embd.weight": (4, 8), "blk.0.attn_q.weight": (8, 8)}
    )
    result = estimate_model(info, LoadOptions())
    assert result.per_layer == () and result.kv_cache == 0 and result.kv_per_layer == 0
    assert result.non_repeating == result.weights == info.tensor_bytes
    assert result.on_cpu(0) == result.total()
    assert plan_gpu_layers(result, [GpuDevice(0, "big", 80 * GiB, 80 * GiB)], n_layer=0).layers == 1


def test_no_metadata_at_all_does_not_crash(tmp_path: Path) -> None:
    info = write_gguf(tmp_path / "bare.gguf", {}, {"some.weight": (8,)})
    result = estimate_model(info, LoadOptions())
    assert (result.weights, result.kv_cache, result.per_layer) == (32, 0, ())
    assert result.compute >= 0


def test_garbage_metadata_values_fall_back(tmp_path: Path) -> None:
    info = write_gguf(tmp_path / "odd.gguf", {"block_count": 2, "embedding_length": 8}, {"blk.0.x.weight": (8,)})
    info.metadata["llama.attention.head_count"] = "nine"  # damaged types read back as other types
    info.metadata["llama.attention.key_length"] = True
    result = estimate_model(info, LoadOptions(num_ctx=16))
    assert result.kv_cache == 16 * 2 * (8 + 8) * 2  # full multi-head attention over n_embd 8


def test_per_layer_kv_heads_and_explicit_head_lengths(tmp_path: Path) -> None:
    metadata = {
        "block_count": 3,
        "embedding_length": 16,
        "attention.head_count": 4,
        "attention.head_count_kv": [2, 0, 4],
    }
    info = write_gguf(tmp_path / "hybrid.gguf", metadata, {"blk.0.w.weight": (16,), "output.weight": (16, 4)})
    result = estimate_model(info, LoadOptions(num_ctx=32))
    head = 16 // 4
    assert result.kv_cache == 32 * (2 + 0 + 4) * (head + head) * 2  # layer 1 has no attention (a recurrent layer)
    assert result.kv_per_layer == -(-result.kv_cache // 3)
    assert result.on_gpu(3) - result.compute - sum(result.per_layer) == result.kv_cache  # capped, never above

    lengths = {**metadata, "attention.head_count_kv": 1, "attention.key_length": 8, "attention.value_length": 2}
    info = write_gguf(tmp_path / "lengths.gguf", lengths, {"blk.0.w.weight": (16,), "output.weight": (16, 4)})
    assert estimate_model(info, LoadOptions(num_ctx=32)).kv_cache == 32 * 3 * 1 * (8 + 2) * 2


def test_separate_output_layer_leaves_the_cpu_when_offloaded(tmp_path: Path) -> None:
    tensors = {"token_embd.weight": (16, 10), "blk.0.w.weight": (16,), "output.weight": (16, 10)}
    info = write_gguf(tmp_path / "untied.gguf", {"block_count": 1, "embedding_length": 16}, tensors)
    result = estimate_model(info, LoadOptions())
    assert result.output == result.output_moved == 16 * 10 * 4
    assert result.on_cpu(1) - result.on_cpu(2) == result.output
    assert result.on_cpu(2) == 16 * 10 * 4 + result.compute  # token_embd always stays on the CPU


# --- memory budget and system memory ----------------------------------------------------------------------


def test_memory_budget_with_fake_memory() -> None:
    fake = MemoryInfo(total=32 * GiB, available=20 * GiB)
    assert memory_budget(memory=fake) == int(20 * GiB * 0.9) - GiB
    assert memory_budget(memory=fake, reserve=0, fraction=0.5) == 10 * GiB
    assert memory_budget(memory=MemoryInfo(total=GiB, available=GiB // 2)) == 0  # never below 0


def test_system_memory_on_this_machine() -> None:
    info = system_memory()
    assert info.total > info.available > 0
    assert info.total > 256 * MiB
    assert 0 <= memory_budget() < info.available


def test_meminfo_parsing_and_sysconf_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000 kB\nMemFree:  1000 kB\nMemAvailable:   8000 kB\nHugePages_Total: 0\n")
    assert memory._read_meminfo(meminfo) == MemoryInfo(total=16000 * 1024, available=8000 * 1024)
    meminfo.write_text("MemTotal: 16000 kB\nMemFree: 1000 kB\nBuffers: 100 kB\nCached: 900 kB\n")  # old kernels
    assert memory._read_meminfo(meminfo) == MemoryInfo(total=16000 * 1024, available=2000 * 1024)

    monkeypatch.setattr(memory, "_read_meminfo", lambda path: (_ for _ in ()).throw(OSError("no /proc")))
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000, "SC_AVPHYS_PAGES": 250}
    monkeypatch.setattr(memory.os, "sysconf", lambda name: pages[name])
    monkeypatch.setattr(memory, "_cgroup_capped", lambda found, root: found)
    assert system_memory() == MemoryInfo(total=4096 * 1000, available=4096 * 250)


def test_cgroup_limit_caps_memory(tmp_path: Path) -> None:
    host = MemoryInfo(total=64 * GiB, available=60 * GiB)
    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {512 * MiB}\n")
    assert memory._cgroup_capped(host, tmp_path) == MemoryInfo(total=4 * GiB, available=GiB + 512 * MiB)
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_capped(host, tmp_path) == host
    assert memory._cgroup_capped(host, tmp_path / "missing") == host


# --- GPUs through NVML --------------------------------------------------------------------------------------


def fake_nvml(devices: list[tuple[str, str, int, int]], *, init_error: Exception | None = None) -> types.ModuleType:
    """A stand-in pynvml module with (uuid, name, total, free) devices."""
    module = types.ModuleType("pynvml")
    module.shutdowns = 0  # type: ignore[attr-defined]

    def init() -> None:
        if init_error is not None:
            raise init_error

    def shutdown() -> None:
        module.shutdowns += 1  # type: ignore[attr-defined]

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: devices[index]  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda handle: handle[0]  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda handle: handle[1].encode()  # type: ignore[attr-defined]  # old pynvml: bytes
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(total=handle[2], used=0, free=handle[3])  # type: ignore[attr-defined]
    return module


TWO_GPUS = [("GPU-aaaa-1111", "NVIDIA A", 24 * GiB, 20 * GiB), ("GPU-bbbb-2222", "NVIDIA B", 8 * GiB, 7 * GiB)]


def test_gpu_devices_is_empty_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert gpu_devices() == []


def test_gpu_devices_on_this_machine_never_raises() -> None:
    assert isinstance(gpu_devices(), list)


def test_gpu_devices_is_empty_when_nvml_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO_GPUS, init_error=RuntimeError("NVML_ERROR_DRIVER")))
    assert gpu_devices() == []


def test_gpu_devices_is_empty_when_a_query_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_nvml(TWO_GPUS)
    module.nvmlDeviceGetMemoryInfo = lambda handle: (_ for _ in ()).throw(RuntimeError("GPU is lost"))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert gpu_devices() == []
    assert module.shutdowns == 1  # type: ignore[attr-defined]


def test_gpu_devices_through_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_nvml(TWO_GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_devices() == [GpuDevice(0, "NVIDIA A", 24 * GiB, 20 * GiB), GpuDevice(1, "NVIDIA B", 8 * GiB, 7 * GiB)]
    assert module.shutdowns == 1  # type: ignore[attr-defined]
    # CUDA_VISIBLE_DEVICES hides and renumbers devices, by index or UUID prefix, as CUDA (and llama.cpp) sees them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_devices() == [GpuDevice(0, "NVIDIA B", 8 * GiB, 7 * GiB)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,0")
    assert [(d.index, d.name) for d in gpu_devices()] == [(0, "NVIDIA B"), (1, "NVIDIA A")]
    for hidden in ("", "-1", "7", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert gpu_devices() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,9,1")  # CUDA ignores everything after an invalid entry
    assert [d.name for d in gpu_devices()] == ["NVIDIA A"]


# --- the offload plan -----------------------------------------------------------------------------------


def test_plan_without_gpu(estimate: ModelEstimate) -> None:
    assert plan_gpu_layers(estimate, [], n_layer=N_LAYER) == GpuPlan(0, None, "no GPU")


def test_plan_on_a_big_gpu_offloads_everything(estimate: ModelEstimate) -> None:
    plan = plan_gpu_layers(estimate, [GpuDevice(0, "NVIDIA H100", 80 * GiB, 79 * GiB)], n_layer=N_LAYER)
    assert (plan.layers, plan.device) == (N_LAYER + 1, 0)
    assert "31/31 layers fit" in plan.reason and "79 GiB free on GPU 0 (NVIDIA H100)" in plan.reason


def test_plan_on_a_small_gpu_offloads_part(estimate: ModelEstimate) -> None:
    reserve = 512 * MiB
    free = reserve + estimate.on_gpu(12) + 1  # exactly 12 layers fit
    plan = plan_gpu_layers(estimate, [GpuDevice(0, "NVIDIA T4", 16 * GiB, free)], n_layer=N_LAYER, reserve=reserve)
    assert (plan.layers, plan.device) == (12, 0)
    assert plan.reason.startswith("12/31 layers fit in") and "NVIDIA T4" in plan.reason
    assert "all would need " + format_bytes(estimate.on_gpu(N_LAYER + 1)) in plan.reason


def test_plan_respects_the_reserve(estimate: ModelEstimate) -> None:
    device = [GpuDevice(0, "NVIDIA X", 8 * GiB, estimate.on_gpu(N_LAYER + 1))]
    assert plan_gpu_layers(estimate, device, n_layer=N_LAYER, reserve=0).layers == N_LAYER + 1
    assert plan_gpu_layers(estimate, device, n_layer=N_LAYER, reserve=1).layers == N_LAYER
    too_small = plan_gpu_layers(estimate, device, n_layer=N_LAYER, reserve=estimate.on_gpu(N_LAYER + 1))
    assert (too_small.layers, too_small.device) == (0, None)
    assert too_small.reason.startswith("no layer fits")


def test_plan_picks_the_gpu_with_most_free_memory(estimate: ModelEstimate) -> None:
    need = estimate.on_gpu(N_LAYER + 1)
    devices = [
        GpuDevice(0, "busy", 80 * GiB, 512 * MiB + estimate.on_gpu(3)),
        GpuDevice(1, "idle", 16 * GiB, 512 * MiB + need),
        GpuDevice(2, "tiny", 4 * GiB, 512 * MiB),
    ]
    plan = plan_gpu_layers(estimate, devices, n_layer=N_LAYER)
    assert (plan.layers, plan.device) == (N_LAYER + 1, 1)
    assert "GPU 1 (idle)" in plan.reason


def test_plan_honours_a_request(estimate: ModelEstimate) -> None:
    small = [GpuDevice(3, "NVIDIA tiny", GiB, 100 * MiB)]
    assert plan_gpu_layers(estimate, small, n_layer=N_LAYER, requested=20) == GpuPlan(20, 3, "requested")
    assert plan_gpu_layers(estimate, small, n_layer=N_LAYER, requested=999).layers == N_LAYER + 1
    assert plan_gpu_layers(estimate, small, n_layer=N_LAYER, requested=0) == GpuPlan(0, None, "requested")
    assert plan_gpu_layers(estimate, [], n_layer=N_LAYER, requested=8) == GpuPlan(8, None, "requested")


# --- the fallback ladder -------------------------------------------------------------------------------


def ladder_summary(options: LoadOptions, plan: GpuPlan, **kwargs: Any) -> list[tuple[int, int, int, str]]:
    return [(o.num_gpu, o.num_ctx, o.main_gpu, text) for o, text in fallback_ladder(options, plan, **kwargs)]


def test_fallback_ladder_order_and_contents() -> None:
    options = LoadOptions(num_ctx=8192, num_batch=256)
    assert ladder_summary(options, GpuPlan(24, 1, "24/31 layers fit")) == [
        (24, 8192, 1, "24 layers on GPU 1"),
        (12, 8192, 1, "12 layers on GPU 1"),
        (6, 8192, 1, "6 layers on GPU 1"),
        (3, 8192, 1, "3 layers on GPU 1"),
        (1, 8192, 1, "1 layer on GPU 1"),
        (0, 8192, 0, "CPU only"),
        (0, 4096, 0, "CPU only, num_ctx 4096"),
        (0, 2048, 0, "CPU only, num_ctx 2048"),
    ]
    for attempt, _ in fallback_ladder(options, GpuPlan(24, 1, "")):
        assert attempt.num_batch == 256  # everything else is kept


def test_fallback_ladder_without_gpu_and_small_contexts() -> None:
    assert ladder_summary(LoadOptions(num_ctx=4096), GpuPlan(0, None, "no GPU")) == [
        (0, 4096, 0, "CPU only"),
        (0, 2048, 0, "CPU only, num_ctx 2048"),
    ]
    assert ladder_summary(LoadOptions(num_ctx=1024), GpuPlan(0, None, "no GPU")) == [(0, 1024, 0, "CPU only")]
    odd = ladder_summary(LoadOptions(num_ctx=3000), GpuPlan(0, None, ""), min_ctx=1024)
    assert [ctx for _, ctx, _, _ in odd] == [3000, 1500, 1024]
    assert [ctx for _, ctx, _, _ in ladder_summary(LoadOptions(num_ctx=3000), GpuPlan(0, None, ""))] == [3000, 2048]


def test_fallback_ladder_has_no_duplicates() -> None:
    for layers in range(0, 40):
        for num_ctx in (512, 2048, 2049, 4096, 32768):
            attempts = [options for options, _ in fallback_ladder(LoadOptions(num_ctx=num_ctx), GpuPlan(layers, 0, ""))]
            assert len(attempts) == len({options.model_dump_json() for options in attempts})
            assert attempts[0].num_gpu == layers
            texts = [text for _, text in fallback_ladder(LoadOptions(num_ctx=num_ctx), GpuPlan(layers, 0, ""))]
            assert len(texts) == len(set(texts))


# --- formatting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (98 * MiB + 300_000, "98 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (int(7.8 * GiB), "7.8 GiB"),
        (80 * GiB, "80 GiB"),
        (3 << 40, "3.0 TiB"),
        (-2 * MiB, "-2.0 MiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
