"""Check ember's GPU paths where a CUDA GPU exists, and print what they measure:

1. the llama.cpp engine with every layer offloaded (num_gpu -1), and whether llama-cpp-python was built with CUDA;
2. the whole-batch prefill path: pp512 and pp1536 tokens/s (ember's llama-bench tests, in this process);
3. the NVML readings ember shows (serve/memory.py gpu_devices, serve/metrics.py nvml_readings);
4. the transformers engine on CUDA (device_map auto): SmolLM2 converted from its bundled GGUF, greedy decode
   tokens/s with 1 and with 4 concurrent requests in one static batch.

On a machine without a GPU it says so, runs the same parts on the CPU (offloading reports 0 layers) and exits 0.

    .venv/bin/python bench/gpu_check.py [--model-dir DIR] [--skip-transformers] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REBUILD = (
    'CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall --no-cache-dir --no-binary '
    "llama-cpp-python 'llama-cpp-python==0.3.36'"
)
CONVERT = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
AutoModelForCausalLM.from_pretrained(
    gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
).save_pretrained(out)
"""
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "List three colors.", "Name a fruit.")


def say(text: str) -> None:
    print(text, flush=True)


def check_gpu() -> dict[str, Any]:
    from ember.engine.llamacpp import supports_gpu_offload
    from ember.serve.memory import gpu_devices
    from ember.serve.metrics import nvml_readings

    devices = gpu_devices()
    found: dict[str, Any] = {
        "nvml_devices": [vars(device) for device in devices],
        "nvml_readings": nvml_readings(),
        "llama_cpp_gpu_offload": supports_gpu_offload(),
    }
    try:
        import torch

        found["torch_cuda"] = torch.cuda.is_available()
        found["torch"] = torch.__version__
    except ImportError:
        found["torch_cuda"] = None
    if not devices:
        say("no CUDA GPU here (NVML lists none): running the CPU parts")
    for device in devices:
        say(f"GPU {device.index}: {device.name}, {device.free / 2**30:.1f} of {device.total / 2**30:.1f} GiB free")
    for reading in found["nvml_readings"]:
        say(f"NVML as /metrics reads it: {reading}")
    if devices and not found["llama_cpp_gpu_offload"]:
        say(f"llama-cpp-python here has no GPU support; rebuild it with CUDA:\n  {REBUILD}")
    return found


def check_llama_cpp(found: dict[str, Any]) -> dict[str, Any]:
    from ember.benchmark.local import run_local
    from ember.loaded_model import LoadedModel
    from ember.options import load_options
    from ember.store.resolve import resolve_model

    source = resolve_model("smollm2")
    model = LoadedModel(source, load_options({"num_ctx": 2048, "num_gpu": -1}))
    try:
        layers = model.model.gpu_layers
        answer = "".join(chunk.response for chunk in model.generate(_request("What is the capital of France?", 16)))
    finally:
        model.close()
    say(f"llama.cpp: {layers} layers offloaded (999 = all), answer {answer.strip()[:60]!r}")
    started = time.perf_counter()
    report = run_local("smollm2", n_prompt=[512, 1536], n_gen=[64], repetitions=2, threads=[0], batch_sizes=[2048])
    rates = {result.test: round(result.avg_ts, 1) for result in report.results}
    say(f"llama.cpp whole-batch prefill (n_batch 2048): {rates} tokens/s ({time.perf_counter() - started:.0f} s)")
    if found["nvml_readings"]:
        from ember.serve.metrics import nvml_readings

        say(f"NVML after the llama.cpp runs: {nvml_readings()}")
    return {"gpu_layers": layers, "rates": rates}


def _request(prompt: str, n: int) -> Any:
    from ember.types import GenerateRequest

    return GenerateRequest(prompt=prompt, options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": n})


def check_transformers(model_dir: Path | None) -> dict[str, Any]:
    try:
        import torch  # noqa: F401
    except ImportError:
        say("transformers engine: not installed; pip install 'ember[transformers]'")
        return {}
    from ember.engine_transformers.generator import Batcher, GenJob
    from ember.engine_transformers.runner import Answering
    from ember.options import load_options
    from ember.store.bundled import DEFAULT_MODEL
    from ember.store.resolve import TRANSFORMERS, ModelSource

    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp(prefix="smollm2-tf-"))
        gguf = DEFAULT_MODEL.locate()
        say(f"converting {gguf.name} to a model directory at {model_dir} ...")
        subprocess.run([sys.executable, "-c", CONVERT, str(gguf), str(model_dir)], check=True)
    source = ModelSource(name="smollm2-tf", path=model_dir, engine=TRANSFORMERS)
    answering = Answering(source, load_options({"num_ctx": 2048, "num_parallel": 4}))
    hf = answering.hf
    say(f"transformers: loaded on {hf.device} (device_map {hf.device_map}) in {hf.load_duration_ns / 1e9:.1f} s")
    results: dict[str, Any] = {"device": str(hf.device)}
    for batch in (1, 4):
        rates = []
        for _ in range(2):  # the first run warms up
            batcher = Batcher(hf, batch)
            prompt = hf.tokenize(hf.render([{"role": "user", "content": PROMPTS[0]}]), specials=False)
            jobs = [GenJob(f"r{i}", 0, prompt, _sampling(), 64) for i in range(batch)]
            for job in jobs:
                batcher.submit(job)
            batcher.step()  # the prefill
            started = time.perf_counter()
            while batcher.has_work():
                batcher.step()
            tokens = sum(len(job.output) - 1 for job in jobs)
            rates.append(tokens / (time.perf_counter() - started))
        results[f"batch{batch}_tokens_per_s"] = round(rates[-1], 1)
        say(f"transformers: {batch} concurrent, {rates[-1]:.1f} tokens/s aggregate decode")
    answering.close()
    return results


def _sampling() -> Any:
    from ember.options import sampling_options

    return sampling_options({"temperature": 0, "repeat_penalty": 1.0, "num_predict": 64})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a transformers model directory (default: convert SmolLM2)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    figures: dict[str, Any] = {"gpu": check_gpu()}
    figures["llama_cpp"] = check_llama_cpp(figures["gpu"])
    if not args.skip_transformers:
        figures["transformers"] = check_transformers(args.model_dir)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
