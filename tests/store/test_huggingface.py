"""Hugging Face references resolve to one GGUF file on a fake hub (HF_ENDPOINT), and hostile ones never do."""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from ember.errors import InvalidRequestError, ModelNotFoundError, PullError
from ember.store.download import download
from ember.store.huggingface import is_hf_reference, resolve_hf_reference
from ember.store.names import parse_model_name
from tests.http_server import FileServer

FILES = {
    "Repo-Q2_K.gguf": b"q2k" * 1000,
    "Repo-Q4_0.gguf": b"q40" * 1000,
    "Repo-Q4_0_4_4.gguf": b"q4044" * 1000,
    "Repo-Q4_1.gguf": b"q41" * 1000,
    "Repo-Q4_K_M.gguf": b"q4km" * 50_000,
    "Repo-Q8_0.gguf": b"q80" * 1000,
    "mmproj-Repo-F16.gguf": b"projector" * 100,
    "README.md": b"# Repo\n",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FileServer]:
    """A fake hub at HF_ENDPOINT with owner/repo; no token anywhere, online whatever the environment says."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FileServer() as server:
        server.add_hf_repo("owner/repo", FILES)
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        yield server


def test_the_default_choice_is_q4_k_m_and_it_downloads(hub: FileServer, tmp_path: Path) -> None:
    hf = resolve_hf_reference("hf.co/owner/repo")

    assert hf.repo_id == "owner/repo"
    assert hf.filename == "Repo-Q4_K_M.gguf"
    assert hf.url == hub.url("/owner/repo/resolve/main/Repo-Q4_K_M.gguf")
    assert hf.suggested_name == "hf.co/owner/repo:q4_k_m"
    assert str(parse_model_name(hf.suggested_name)) == hf.suggested_name
    assert hf.headers == {}
    assert hf.sha256 == "sha256:" + hashlib.sha256(FILES["Repo-Q4_K_M.gguf"]).hexdigest()
    assert hf.size == len(FILES["Repo-Q4_K_M.gguf"])
    # the one request huggingface_hub 2.x makes for model_info(files_metadata=True)
    assert [(r.method, r.path) for r in hub.requests] == [("GET", "/api/models/owner/repo?blobs=true")]

    result = download(hf.url, tmp_path / "partial", expected_sha256=hf.sha256, headers=hf.headers)
    assert result.digest == hf.sha256
    assert hub.requests[-1].path.startswith("/cdn/")  # followed the hub's redirect


@pytest.mark.parametrize("ref", ["hf.co/owner/repo:q4_1", "HF.CO/owner/repo:Q4_1", "huggingface.co/owner/repo:Q4_1"])
def test_a_quantization_picks_its_file(hub: FileServer, ref: str) -> None:
    hf = resolve_hf_reference(ref)
    assert hf.filename == "Repo-Q4_1.gguf"
    assert hf.suggested_name == "hf.co/owner/repo:q4_1"


def test_an_exact_label_wins_over_a_longer_one(hub: FileServer) -> None:
    assert resolve_hf_reference("hf.co/owner/repo:Q4_0").filename == "Repo-Q4_0.gguf"
    assert resolve_hf_reference("hf.co/owner/repo:latest").filename == "Repo-Q4_K_M.gguf"


def test_an_unknown_quantization_lists_the_available_ones(hub: FileServer) -> None:
    with pytest.raises(ModelNotFoundError, match="no Q6_K file") as caught:
        resolve_hf_reference("hf.co/owner/repo:Q6_K")
    assert "available: Q2_K, Q4_0, Q4_0_4_4, Q4_1, Q4_K_M, Q8_0" in str(caught.value)
    assert "F16" not in str(caught.value)  # the projector is no model


def test_an_ambiguous_quantization_lists_the_matches(hub: FileServer) -> None:
    with pytest.raises(InvalidRequestError, match="Q4 matches several files") as caught:
        resolve_hf_reference("hf.co/owner/repo:Q4")
    assert "Repo-Q4_1.gguf" in str(caught.value)


def test_an_explicit_file_needs_no_listing(hub: FileServer) -> None:
    hf = resolve_hf_reference("hf.co/owner/repo/sub/dir/Model-Q5_K_M.gguf")

    assert hf.filename == "sub/dir/Model-Q5_K_M.gguf"
    assert hf.url == hub.url("/owner/repo/resolve/main/sub/dir/Model-Q5_K_M.gguf")
    assert hf.suggested_name == "hf.co/owner/repo:q5_k_m"
    assert hf.sha256 is None
    assert hub.requests == []


def test_a_tag_from_the_file_stem_when_there_is_no_quantization(hub: FileServer) -> None:
    hf = resolve_hf_reference("hf.co/owner/repo/My_Model+v2.gguf")
    assert hf.suggested_name == "hf.co/owner/repo:my_model-v2"
    parse_model_name(hf.suggested_name)


def test_a_missing_repository_is_model_not_found(hub: FileServer) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape("no model hf.co/owner/nothing-here on http://127.0.0.1")):
        resolve_hf_reference("hf.co/owner/nothing-here")


def test_a_private_repository_without_a_token_points_at_hf_token(hub: FileServer) -> None:
    hub.errors["/api/models/owner/private"] = 401
    with pytest.raises(PullError, match="HTTP 401; set HF_TOKEN"):
        resolve_hf_reference("hf.co/owner/private")


def test_a_repository_without_gguf_files(hub: FileServer) -> None:
    hub.add_hf_repo("owner/safetensors", {"model.safetensors": b"x", "mmproj-model-f16.gguf": b"y"})
    with pytest.raises(ModelNotFoundError, match="has no GGUF model file"):
        resolve_hf_reference("hf.co/owner/safetensors")


def test_split_models_are_refused(hub: FileServer) -> None:
    hub.add_hf_repo("owner/split", {f"Big-Q4_K_M-0000{i}-of-00002.gguf": b"part" for i in (1, 2)})
    with pytest.raises(PullError, match="split into several files"):
        resolve_hf_reference("hf.co/owner/split")


def test_the_token_is_sent_and_returned(hub: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hf = resolve_hf_reference("hf.co/owner/repo:q8_0")
    assert hf.headers == {"Authorization": "Bearer hf_secret"}
    assert hub.requests[-1].headers["Authorization"] == "Bearer hf_secret"


def test_an_unreachable_hub_is_a_pull_error(hub: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PullError, match=re.escape(f"cannot reach http://127.0.0.1:{port}")):
        resolve_hf_reference("hf.co/owner/repo")


@pytest.mark.parametrize(
    "ref",
    [
        "hf.co/../x",
        "hf.co/a/b/../../c.gguf",
        "hf.co/a/b/./c.gguf",
        "hf.co/a/..",
        "hf.co/a",
        "hf.co/",
        "hf.co//b",
        "hf.co/a//b.gguf",
        "hf.co/a/b/c.txt",
        "hf.co/a/b/c.gguf:q4_0",
        "hf.co/a/b:q4/../x",
        "hf.co/a/b:",
        "hf.co/-a/b",
        "hf.co/a/b./c.gguf",
        "hf.co/a..b/c",
        "hf.co/a/b/%2e%2e/c.gguf",
        "hf.co/a/b/..%2fc.gguf",
        "hf.co/a/b\\..\\c.gguf",
        "hf.co/a/b/.hidden.gguf",
        "hf.co/a b/c",
        "example.com/a/b",
    ],
)
def test_hostile_or_malformed_references_are_refused(hub: FileServer, ref: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"hf\.co/\{owner\}/\{repo\}"):
        resolve_hf_reference(ref)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf.co/a/b", True),
        ("HF.co/a/b:Q4_K_M", True),
        ("huggingface.co/a/b", True),
        ("  hf.co/a/b", True),
        ("smollm2", False),
        ("hf.com/a/b", False),
        ("./hf.co/a/b", False),
    ],
)
def test_is_hf_reference(text: str, expected: bool) -> None:
    assert is_hf_reference(text) is expected
