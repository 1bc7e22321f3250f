"""Model names: `[host/][namespace/]model[:tag]`, validated by construction.

Every part must match a strict pattern (letters, digits, `_`, `.`, `-`, starting with a letter, digit or
`_`), so no part can be `..`, empty, or contain a separator: a name can never point outside the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.errors import InvalidRequestError

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 350
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}(:[0-9]{1,5})?")


@dataclass(frozen=True)
class ModelName:
    model: str
    tag: str = DEFAULT_TAG
    namespace: str | None = None
    host: str | None = None

    def __str__(self) -> str:
        return f"{self.path_name}:{self.tag}"

    @property
    def path_name(self) -> str:
        """The name without its tag: `[host/][namespace/]model`."""
        return "/".join(part for part in (self.host, self.namespace, self.model) if part)


def parse_model_name(text: str) -> ModelName:
    """Parse and validate a model name; names are case-insensitive and stored in lower case.

    >>> str(parse_model_name("SmolLM2:135m"))
    'smollm2:135m'
    >>> parse_model_name("../etc/passwd")
    Traceback (most recent call last):
    ...
    ember.errors.InvalidRequestError: invalid model name '../etc/passwd': ...
    """
    name = text.strip().lower()

    def invalid(reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"invalid model name {text!r}: {reason}")

    if not name:
        raise invalid("it is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise invalid(f"it is longer than {MAX_NAME_LENGTH} characters")
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", DEFAULT_TAG)
    if not _PART.fullmatch(tag):
        raise invalid("the tag must be letters, digits, '_', '.', '-' (at most 80)")
    parts = path.split("/")
    if len(parts) > 3:
        raise invalid("use at most host/namespace/model")
    host = parts[0] if len(parts) == 3 else None
    namespace = parts[-2] if len(parts) >= 2 else None
    model = parts[-1]
    for part in (model, namespace):
        if part is not None and not _PART.fullmatch(part):
            raise invalid("each part must be letters, digits, '_', '.', '-', starting with a letter or digit")
    if host is not None and not _HOST.fullmatch(host):
        raise invalid(f"{host!r} is not a valid host")
    return ModelName(model=model, tag=tag, namespace=namespace, host=host)
