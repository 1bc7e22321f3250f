"""SmolLM2 as a Hugging Face model directory, made once per run from the bundled GGUF by transformers' own
GGUF loader (dequantized from Q4_1 to float32) and save_pretrained: no hub, the same weights as llama.cpp's."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ember.store.bundled import DEFAULT_MODEL

CONVERT = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.utils import logging
logging.disable_progress_bar()
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(
    gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A model directory of `gguf` at `out` (kept when it is already complete)."""
    done = out / ".converted"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", CONVERT, str(gguf), str(out)], check=True, timeout=600)
    done.write_text("ok")
    return out


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted directory, under pytest's cache when it is on (so later runs reuse it), else this run's tmp."""
    gguf = DEFAULT_MODEL.locate()
    key = hashlib.sha256(f"{gguf.stat().st_size}-{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("smollm2-transformers") if cache is not None else tmp_path_factory.mktemp("smollm2-tf")
    return convert_gguf(gguf, Path(base) / key)
