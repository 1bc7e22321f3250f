"""The benchmark scripts run and report what they claim (their speed figures are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_vs_raw_reports_both_sides_and_their_ratio() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "engine_vs_raw.py"),
            "--runs",
            "1",
            "--tokens",
            "12",
            "--prompt-tokens",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["prompt_tokens"] == 32 and figures["generated_tokens"] == 12
    for key in ("raw_prefill_tok_s", "raw_decode_tok_s", "ember_prefill_tok_s", "ember_decode_tok_s"):
        assert figures[key] > 0
    assert figures["decode_ratio"] > 0 and figures["prefill_ratio"] > 0
