"""Fallback models: who answers when a model cannot (it fails to load, its circuit is open, its queue is full).

A model's fallbacks come from EMBER_FALLBACKS (by the name asked for, or the name it resolved to) and from its
Modelfile's `PARAMETER fallback`, tried in that order; each is resolved and validated like the request itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ember.errors import EmberError
from ember.serve.resolve import Resolved

log = logging.getLogger(__name__)


async def next_fallback(
    prepare: Callable[[Any, int], Resolved[Any]],
    fallbacks: Mapping[str, Sequence[str]],
    resolved: Resolved[Any],
    tried: list[str],
) -> Resolved[Any] | None:
    """The next fallback of the model asked for that has not been tried, resolved like the request (None: no
    more). `prepare(request, priority)` resolves a request; one that cannot be used is logged and passed over."""
    names = [*fallbacks.get(resolved.name, ()), *fallbacks.get(resolved.request.model, ())]
    own = resolved.source.parameters.get("fallback", ())
    names += [own] if isinstance(own, str) else list(own)
    for name in names:
        try:
            candidate = await asyncio.to_thread(
                prepare, resolved.request.model_copy(update={"model": name}), int(resolved.priority)
            )
        except EmberError as error:
            log.warning("fallback %s of %s cannot be used: %s", name, resolved.name, error)
            continue
        if candidate.name not in tried:
            return candidate
    return None
