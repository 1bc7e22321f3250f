"""Upstream models: a store entry that names OpenAI-compatible servers (vLLM, trtllm-serve, llama-server, another
ember) instead of a model file. Requests to it are served by ember.upstream.runner.

In a Modelfile, each replica is one FROM line, `upstream+` and the server's OpenAI base URL, then the model's
name on that server; every replica serves the same model::

    FROM upstream+http://gpu-a:8000/v1 meta-llama/Llama-3.1-70B-Instruct
    FROM upstream+http://gpu-b:8000/v1 meta-llama/Llama-3.1-70B-Instruct
    PARAMETER upstream_key_env VLLM_API_KEY     # the NAME of the variable that holds the key, never the key

The key is read from that variable in the environment of `ember serve` when the model is first used; only
the variable's name is stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ember.errors import InvalidRequestError

UPSTREAM = "upstream"  # ModelSource.engine of an upstream model
UPSTREAM_PREFIX = "upstream+"
KEY_ENV_PARAMETER = "upstream_key_env"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class UpstreamSpec:
    """Where an upstream model is served: its replicas' base URLs (ending in /v1), the model's name there, and
    the name of the environment variable that holds the key (None: no key)."""

    replicas: tuple[str, ...]
    model: str
    key_env: str | None = None

    def to_json(self) -> bytes:
        document = {"replicas": list(self.replicas), "model": self.model, "key_env": self.key_env}
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_json(cls, document: Any) -> UpstreamSpec:
        return cls(tuple(document["replicas"]), str(document["model"]), document.get("key_env"))

    def from_lines(self) -> list[str]:
        """The FROM values that recreate it in a Modelfile."""
        return [f"{UPSTREAM_PREFIX}{url} {self.model}" for url in self.replicas]


def is_upstream(value: str) -> bool:
    return value.strip().lower().startswith(UPSTREAM_PREFIX)


def parse_upstream_from(value: str) -> tuple[str, str]:
    """`upstream+http://host:8000/v1 MODEL` -> (base URL without a trailing slash, MODEL)."""
    parts = value.strip()[len(UPSTREAM_PREFIX) :].split()
    if len(parts) != 2:
        raise InvalidRequestError(
            "an upstream FROM is `FROM upstream+http://HOST:PORT/v1 MODEL`: the server's OpenAI base URL, a space, "
            "and the model's name on that server"
        )
    url, model = parts
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        raise InvalidRequestError(
            f"upstream URL {url!r} must be http:// or https:// with a host, as in http://gpu:8000/v1"
        )
    if split.username or split.password:
        raise InvalidRequestError(
            "an upstream URL must not carry credentials; put the key in an environment variable and name it with "
            f"PARAMETER {KEY_ENV_PARAMETER}"
        )
    if split.query or split.fragment:
        raise InvalidRequestError(f"upstream URL {url!r} must not have a query or a fragment")
    return url.rstrip("/"), model


def check_key_env(name: str) -> str:
    """The name of an environment variable; the value itself is never echoed (it may be a key pasted by mistake)."""
    name = name.strip()
    if not _ENV_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"PARAMETER {KEY_ENV_PARAMETER} takes the NAME of an environment variable (letters, digits and _), "
            "such as VLLM_API_KEY, never the key itself"
        )
    return name


def build_spec(from_values: list[str], key_env: str | None) -> UpstreamSpec:
    """The spec from a Modelfile's upstream FROM values; every replica must name the same model."""
    parsed = [parse_upstream_from(value) for value in from_values]
    models = {model for _, model in parsed}
    if len(models) != 1:
        raise InvalidRequestError(
            f"the upstream FROM lines name different models ({', '.join(sorted(models))}); replicas serve one model"
        )
    urls = [url for url, _ in parsed]
    if len(set(urls)) != len(urls):
        raise InvalidRequestError("an upstream replica is listed twice")
    return UpstreamSpec(tuple(urls), models.pop(), key_env)
