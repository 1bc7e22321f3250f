"""Every setting is documented where users look: `ember serve --help`."""

from __future__ import annotations

import subprocess
import sys

from ember.config import Settings


def test_serve_help_lists_every_setting_with_its_description() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert shown.returncode == 0, shown.stderr
    flat = " ".join(shown.stdout.split())
    for name, field in Settings.model_fields.items():
        assert f"EMBER_{name.upper()}=" in flat
        assert field.description and " ".join(field.description.split()) in flat
    for flag in ("--host", "--parallel", "--max-loaded-models", "--keep-alive"):
        assert flag in flat
