"""bench/web_render.py runs and reports its figures; the page keeps only the messages near the view."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_render_bench_reports_and_the_page_renders_only_what_is_near_the_view(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "web_render.py"), "--messages", "300", "--runs", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["messages"] == 300 and figures["open_ms_median"] > 0 and figures["scroll_frame_ms_median"] > 0
    assert 2 <= figures["message_elements_max"] <= 40  # of 300: the rest are not in the page
