"""Several processes pulling, creating, copying and removing at once leave a consistent store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ember.store.store import ModelStore
from tests.gguf_files import write_tiny_gguf

WORKER = textwrap.dedent(
    """
    import random, sys
    from ember.errors import EmberError
    from ember.store.create import create
    from ember.store.pull import pull
    from ember.store.store import ModelStore

    worker, rounds, tiny, other = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    store = ModelStore()
    rng = random.Random(worker)
    names = [f"m{i}" for i in range(4)]
    for _ in range(rounds):
        action = rng.choice(["pull", "pull", "create", "cp", "rm", "rm"])
        name = rng.choice(names)
        try:
            if action == "pull":
                pull(rng.choice([tiny, other]), name=name)
            elif action == "create":
                create(name, f"FROM {rng.choice(names)}\\nSYSTEM worker {worker}\\nPARAMETER temperature 0.{worker}\\n")
            elif action == "cp":
                store.copy(rng.choice(names), name)
            else:
                store.remove(name)
        except EmberError as error:  # a missing model is expected when another worker removed it
            if "not found" not in str(error) and "no such model" not in str(error) and "missing" not in str(error):
                raise
    """
)


def test_concurrent_pull_create_cp_rm_leave_a_consistent_store(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    other = write_tiny_gguf(tmp_path / "other.gguf", tensors=2)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(index), "40", str(tiny), str(other)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for index in range(4)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr

    store = ModelStore()
    referenced: set[str] = set()
    for manifest in store.list():
        for digest in manifest.digests:
            assert store.blob_path(digest).is_file(), f"{manifest.name} refers to a missing blob {digest}"
        referenced |= manifest.digests
    blobs = {path.name.replace("-", ":", 1) for path in store.blobs.glob("*")}
    assert blobs == referenced, f"orphan blobs: {blobs - referenced}"
    assert list(store.tmp.iterdir()) == []
