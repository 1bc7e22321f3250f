"""Hugging Face references for `ember pull`: `hf.co/{owner}/{repo}[:{quant}]` and `hf.co/{owner}/{repo}/{file}.gguf`.

A reference resolves to one GGUF file's download URL, like Ollama's `hf.co/...` names: without a quantization
the Q4_K_M file is chosen (else the best of a preference list), with one the file whose name carries it.
Every part of a reference is checked against a strict pattern before it reaches a URL, so no reference can
name a path outside the repository.

The hub endpoint is read from HF_ENDPOINT at call time, not huggingface_hub's import-time constant, so a
process (or a test) can point ember at a mirror after import.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import httpx
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from ember.errors import InvalidRequestError, ModelNotFoundError, PullError
from ember.store.names import parse_model_name

DEFAULT_ENDPOINT = "https://huggingface.co"
LIST_TIMEOUT_S = 30.0
_PREFIXES = ("hf.co/", "huggingface.co/")
ACCEPTED_FORMS = "hf.co/{owner}/{repo}, hf.co/{owner}/{repo}:{quantization} or hf.co/{owner}/{repo}/{file}.gguf"

# owner and repository names as the hub allows them: letters, digits, '-', '_', '.', no leading or trailing
# '-' or '.', no '--' or '..'
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
_QUANT_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
# a quantization label inside a file name: Q4_K_M, Q8_0, IQ4_XS, TQ1_0, F16, BF16, F32 ...
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])((?:I|T)?Q\d(?:_[A-Za-z0-9]+)*|B?F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Ollama picks Q4_K_M; after it, the common trade-offs from small-and-good to large
QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_0", "Q8_0", "Q5_K_M", "Q4_K_S", "Q5_K_S", "Q6_K", "Q4_1", "Q5_0", "Q5_1",
    "IQ4_XS", "IQ4_NL", "Q3_K_M", "Q3_K_L", "Q3_K_S", "Q2_K", "F16", "BF16", "F32",
)  # fmt: skip


@dataclass(frozen=True)
class HFFile:
    repo_id: str
    filename: str
    url: str
    headers: dict[str, str] = field(hash=False)  # Authorization when a token is set; pass to download()
    suggested_name: str  # e.g. hf.co/owner/repo:q4_k_m, valid for ember.store.names.parse_model_name
    sha256: str | None = None  # "sha256:<hex>" from the hub's LFS metadata when the repo was listed
    size: int | None = None


@dataclass(frozen=True)
class HFDirectory:
    """A repository without GGUF files that holds a transformers model (config.json and safetensors weights):
    pulled whole, as the files a model directory keeps (store/model_directory.py)."""

    repo_id: str
    files: tuple[HFFile, ...]
    suggested_name: str  # hf.co/owner/repo:latest


def is_hf_reference(text: str) -> bool:
    return text.strip().lower().startswith(_PREFIXES)


def resolve_hf_reference(ref: str) -> HFFile | HFDirectory:
    """Resolve a Hugging Face reference to one GGUF file, listing the repository when no file is named; a
    repository with no GGUF file but a transformers model (config.json + safetensors) is that directory."""
    repo_id, filename, quant = _parse_reference(ref)
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    token = huggingface_hub.get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sha256: str | None = None
    size: int | None = None
    if filename is None:
        listing = _list_files(repo_id, endpoint, token)
        files = _gguf_files(listing)
        if not files and quant is None and _is_transformers_model(listing):
            return _directory(repo_id, listing, endpoint, headers)
        if not files:
            raise ModelNotFoundError(
                f"hf.co/{repo_id} has no GGUF model file, nor a transformers model (config.json and .safetensors)"
            )
        filename = _choose_file(repo_id, list(files), quant)
        sha256, size = files[filename]
    url = hf_hub_url(repo_id, filename, endpoint=endpoint)
    return HFFile(
        repo_id=repo_id,
        filename=filename,
        url=url,
        headers=headers,
        suggested_name=_suggested_name(repo_id, filename),
        sha256=sha256,
        size=size,
    )


def _parse_reference(ref: str) -> tuple[str, str | None, str | None]:
    """(repo_id, filename or None, quantization or None), or InvalidRequestError naming the accepted forms."""
    text = ref.strip()

    def invalid(reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"invalid Hugging Face reference {ref!r}: {reason}; use {ACCEPTED_FORMS}")

    prefix = next((p for p in _PREFIXES if text.lower().startswith(p)), None)
    if prefix is None:
        raise invalid("it must start with hf.co/ or huggingface.co/")
    rest = text[len(prefix) :]
    path, quant = rest, None
    if ":" in rest:
        path, _, quant = rest.rpartition(":")
        if not _QUANT_TAG.fullmatch(quant):
            raise invalid("the quantization must be letters, digits, '_', '.', '-' (for example Q4_K_M)")
    parts = path.split("/")
    if len(parts) < 2:
        raise invalid("it names no repository")
    owner, repo, file_parts = parts[0], parts[1], parts[2:]
    for part in (owner, repo):
        if not _REPO_PART.fullmatch(part) or ".." in part or "--" in part:
            raise invalid(f"{part!r} is not a valid owner or repository name")
    filename = None
    if file_parts:
        if quant is not None:
            raise invalid("give either a file or a quantization, not both")
        if not all(_FILE_PART.fullmatch(p) and ".." not in p for p in file_parts):
            raise invalid("each part of the file path must be letters, digits, '_', '.', '+', '-'")
        if not file_parts[-1].lower().endswith(".gguf"):
            raise invalid("the file must be a .gguf file")
        filename = "/".join(file_parts)
    if quant is not None and quant.lower() == "latest":
        quant = None  # Ollama's default tag: the default choice
    return f"{owner}/{repo}", filename, quant


def _gguf_files(listing: dict[str, tuple[str | None, int | None]]) -> dict[str, tuple[str | None, int | None]]:
    """The repository's loadable GGUF files: name -> (sha256 digest, size); no projector (mmproj) files."""
    return {
        name: facts
        for name, facts in listing.items()
        if name.lower().endswith(".gguf") and "mmproj" not in name.lower()
    }


def _is_transformers_model(listing: dict[str, tuple[str | None, int | None]]) -> bool:
    return "config.json" in listing and any(name.endswith(".safetensors") for name in listing)


def _directory(
    repo_id: str, listing: dict[str, tuple[str | None, int | None]], endpoint: str, headers: dict[str, str]
) -> HFDirectory:
    """The files of a model directory the store keeps (no README, no .bin copies, no remote code)."""
    from ember.store.model_directory import KEPT_SUFFIXES

    name = _suggested_name(repo_id, "latest")
    files = []
    for filename in sorted(listing):
        if filename.lower().endswith(KEPT_SUFFIXES) and not any(p.startswith(".") for p in filename.split("/")):
            if not all(_FILE_PART.fullmatch(part) and ".." not in part for part in filename.split("/")):
                raise PullError(f"hf.co/{repo_id} has a file named {filename!r}, which ember will not write")
            sha256, size = listing[filename]
            url = hf_hub_url(repo_id, filename, endpoint=endpoint)
            files.append(HFFile(repo_id, filename, url, headers, name, sha256, size))
    return HFDirectory(repo_id, tuple(files), name)


def _list_files(repo_id: str, endpoint: str, token: str | None) -> dict[str, tuple[str | None, int | None]]:
    """Every file of the repository: name -> (sha256 digest of an LFS file, size).

    huggingface_hub requests `GET {endpoint}/api/models/{repo_id}?blobs=true` (model_info with files_metadata),
    which lists the files with their sizes and LFS sha256 in one request.
    """
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo_id, files_metadata=True, timeout=LIST_TIMEOUT_S)
    except GatedRepoError as exc:
        raise PullError(
            f"hf.co/{repo_id} is gated: accept its conditions at {endpoint}/{repo_id} and set HF_TOKEN to a token "
            "of that account"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(_not_found(repo_id, endpoint, token)) from exc
    except DisabledRepoError as exc:
        raise PullError(f"hf.co/{repo_id} has been disabled on {endpoint}") from exc
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else None
        if status == 404:
            raise ModelNotFoundError(_not_found(repo_id, endpoint, token)) from exc
        hint = "set HF_TOKEN to a token with access to it" if status in (401, 403) else "try again later"
        raise PullError(f"cannot list hf.co/{repo_id} on {endpoint}: HTTP {status}; {hint}") from exc
    except OfflineModeIsEnabled as exc:
        raise PullError(f"cannot list hf.co/{repo_id}: HF_HUB_OFFLINE is set; unset it to pull") from exc
    except _transport_errors() as exc:
        reason = str(exc) or type(exc).__name__
        raise PullError(f"cannot reach {endpoint} to list hf.co/{repo_id}: {reason}; check the network") from exc
    files: dict[str, tuple[str | None, int | None]] = {}
    for sibling in info.siblings or []:
        sha256 = f"sha256:{sibling.lfs.sha256}" if sibling.lfs is not None else None
        files[sibling.rfilename] = (sha256, sibling.size)
    return files


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors huggingface_hub may let through: it uses httpx2 (2.x), httpx (1.x) or requests (0.x)."""
    errors: list[type[BaseException]] = [httpx.TransportError, ConnectionError, TimeoutError]
    try:
        import httpx2  # type: ignore[import-not-found]

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    try:
        import requests  # type: ignore[import-untyped]

        errors.append(requests.RequestException)
    except ImportError:
        pass
    return tuple(errors)


def _not_found(repo_id: str, endpoint: str, token: str | None) -> str:
    hint = "check the owner and repository name" + ("" if token else "; if it is private, set HF_TOKEN")
    return f"no model hf.co/{repo_id} on {endpoint}: {hint}"


def _choose_file(repo_id: str, filenames: list[str], quant: str | None) -> str:
    """The file a quantization names, or the default choice; errors list the quantizations there are.

    Parts of split models (`-00001-of-00003.gguf`) are skipped: one part alone is not a loadable model.
    """
    filenames = sorted(filenames)
    singles = [name for name in filenames if not _is_split_part(name)]
    if quant is None:
        if not singles:
            raise _split_error(repo_id, filenames)
        return _default_choice(singles)
    matches = [name for name in filenames if quant.lower() in name.lower()]
    if matches and not any(name in singles for name in matches):
        raise _split_error(repo_id, filenames)
    matches = [name for name in matches if name in singles]
    if len(matches) > 1:  # Q4_0 is in both Q4_0 and Q4_0_4_4: prefer the exact label
        exact = [name for name in matches if (label := _quant_of(name)) and label.lower() == quant.lower()]
        matches = exact or matches
    if not matches:
        raise ModelNotFoundError(
            f"hf.co/{repo_id} has no {quant} file; available: {_available(filenames)} "
            f"(pull hf.co/{repo_id}:{{quantization}})"
        )
    if len(matches) > 1:
        raise InvalidRequestError(
            f"{quant} matches several files in hf.co/{repo_id}: {', '.join(matches)}; name one with "
            f"hf.co/{repo_id}/{{file}}.gguf or a longer quantization"
        )
    return matches[0]


def _is_split_part(filename: str) -> bool:
    match = _SPLIT_PART.search(filename)
    return match is not None and match.group(2) != "00001"


def _split_error(repo_id: str, filenames: list[str]) -> PullError:
    return PullError(
        f"hf.co/{repo_id} holds that model split into several files; ember cannot pull split GGUF files yet; "
        f"available: {_available(filenames)}"
    )


def _default_choice(filenames: list[str]) -> str:
    if len(filenames) == 1:
        return filenames[0]
    by_quant: dict[str, str] = {}
    for name in filenames:
        label = _quant_of(name)
        if label is not None:
            by_quant.setdefault(label.upper(), name)
    for preferred in QUANT_PREFERENCE:
        if preferred in by_quant:
            return by_quant[preferred]
    return filenames[0]


def _quant_of(filename: str) -> str | None:
    """The last quantization label in a file name (`Llama-3-8B-Q4_K_M.gguf` -> `Q4_K_M`), if any."""
    labels = _QUANT_IN_NAME.findall(_stem(filename))
    return labels[-1] if labels else None


def _stem(filename: str) -> str:
    """The base name without `.gguf` and without a split suffix."""
    base = filename.rsplit("/", 1)[-1]
    return re.sub(r"\.gguf$", "", _SPLIT_PART.sub(".gguf", base), flags=re.IGNORECASE)


def _available(filenames: list[str]) -> str:
    labels = sorted({label.upper() for name in filenames if (label := _quant_of(name))})
    return ", ".join(labels) if labels else ", ".join(filenames)


def _suggested_name(repo_id: str, filename: str) -> str:
    """`hf.co/owner/repo:tag`, the tag from the quantization or else the file stem, valid for the name parser."""
    owner, repo = (_sanitize(part) for part in repo_id.split("/"))
    tag = _sanitize(_quant_of(filename) or _stem(filename)) or "latest"
    name = f"hf.co/{owner}/{repo}:{tag}"
    parse_model_name(name)  # a bug here must not name a path outside the store: fail loudly instead
    return name


def _sanitize(text: str) -> str:
    """Lower case, anything outside [a-z0-9_.-] as '-', no leading '.' or '-', at most 80 characters."""
    cleaned = re.sub(r"[^a-z0-9_.-]", "-", text.lower()).lstrip(".-")
    return cleaned[:80]
