"""`ember pull ./model-dir` and `ember pull hf.co/ORG/REPO` of a repository without GGUF files: a Hugging Face
model directory (config.json, safetensors, tokenizer, chat template) for the transformers engine.

Each kept file becomes a blob of its own (one layer per file), and the model layer is a JSON index of the
files by relative path. One layer per file rather than one tar: a local directory's files are hard-linked into
the store (no copy of gigabytes of weights), a file two models share (a tokenizer, the shards of a fine-tune
that changed only some) is stored once, and the model loads straight from the blobs, through a tree of links
under their names (ModelStore.model_tree), as the Hugging Face cache lays out its snapshots; a tar would be
unpacked into a second copy before every first load.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ember.store.model_directory import ModelDirectory, kept_files, read_model_directory
from ember.store.resolve import TRANSFORMERS
from ember.store.store import MODEL_FILE_MEDIA_TYPE, MODEL_FILES_MEDIA_TYPE, Layer, ModelStore, PendingBlob

if TYPE_CHECKING:
    from ember.store.huggingface import HFDirectory
    from ember.store.pull import ProgressFactory, PullResult


def directory_config(directory: ModelDirectory, source: str) -> dict[str, object]:
    """The manifest's config blob of a model directory (what /api/tags and `ember list` show of it)."""
    from ember.store.pull import format_parameter_count

    return {
        "model_format": "safetensors",
        "model_family": directory.architecture,
        "model_type": format_parameter_count(directory.parameter_count),
        "file_type": directory.stored_dtype,
        "engine": TRANSFORMERS,
        "source": source,
    }


def register_directory(
    store: ModelStore, name: str, directory: ModelDirectory, files: dict[str, Path], source: str, *, link: bool
) -> PullResult:
    """Stage `files` (relative path -> file on disk) as blobs and write the manifest with their index."""
    from ember.store.pull import PullResult

    staged: list[tuple[str, PendingBlob | Layer]] = []
    index: dict[str, str] = {}
    try:
        for relative in sorted(files):
            blob = store.blob_from_file(files[relative], link=link)
            staged.append((MODEL_FILE_MEDIA_TYPE, blob))
            index[relative] = blob.digest
        index_blob = store.blob_from_bytes(json.dumps(index, sort_keys=True).encode())
        manifest = store.commit(
            name, [(MODEL_FILES_MEDIA_TYPE, index_blob), *staged], directory_config(directory, source)
        )
    except BaseException:
        store.discard([blob for _, blob in staged if isinstance(blob, PendingBlob)])
        raise
    return PullResult(manifest, source)


def pull_local_directory(store: ModelStore, path: Path, name: str) -> PullResult:
    directory = read_model_directory(path)  # refuse what is not a model before staging anything
    files = {relative: path / relative for relative in kept_files(path)}
    return register_directory(store, name, directory, files, str(path.resolve()), link=True)


def pull_hf_directory(store: ModelStore, repo: HFDirectory, name: str, progress: ProgressFactory) -> PullResult:
    """Download each file of a Hugging Face model directory (LFS files checked against their sha256), check
    the result as a model directory, and register it."""
    from ember.store.download import download

    folder = store.partial / f"{hashlib.sha256(repo.repo_id.encode()).hexdigest()[:40]}.dir"
    folder.mkdir(parents=True, exist_ok=True)
    store.tmp.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "a+b") as lock:  # one process at a time fills a given folder
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        files: dict[str, Path] = {}
        for entry in repo.files:
            target = folder / f"{hashlib.sha256(entry.filename.encode()).hexdigest()[:32]}.partial"
            with progress(f"pulling {entry.filename}", entry.sha256) as report:
                result = download(
                    entry.url, target, expected_sha256=entry.sha256, headers=entry.headers, progress=report
                )
            files[entry.filename] = result.path
        staging = store.tmp / f"{folder.name}-tree"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for relative, file in files.items():  # the directory as transformers would read it, to check it
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                (staging / relative).symlink_to(file)
            directory = read_model_directory(staging)
            pulled = register_directory(store, name, directory, files, f"hf.co/{repo.repo_id}", link=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return pulled
