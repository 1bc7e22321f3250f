"""The response cache (EMBER_RESPONSE_CACHE=N answers, off by default): an exact repeat of a deterministic
request is answered from memory, without a slot or a runner.

Deterministic means temperature 0 or a fixed seed: the same model file (its digest, or its path and change
time), the same load and sampling options and the same request give the same answer. The key is all of that;
anything else in the request (a different system prompt, one more tool, another n) is another key. Only whole
answers are kept (every choice finished, no error), least recently used first out. A cached answer is marked:
an `X-Ember-Cache: hit` header, `from_cache` in the request log and ember_response_cache_hits_total.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ember.serve.metrics import ServeMetrics
from ember.serve.resolve import Resolved
from ember.serve.tracking import current_request

_NOT_PART_OF_THE_ANSWER = {"keep_alive", "stream", "priority"}


class ResponseCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, list[Any]] = OrderedDict()

    def key(self, resolved: Resolved[Any], choices: int) -> str | None:
        """The request's key, or None when its answer is not deterministic (so it is never cached)."""
        sampling = resolved.sampling
        if sampling.temperature > 0 and sampling.seed < 0:
            return None
        source = resolved.source
        model_file = source.digest or f"{source.path}:{source.path.stat().st_mtime_ns}"
        request = resolved.request.model_dump(mode="json", exclude=_NOT_PART_OF_THE_ANSWER)
        request.pop("options", None)  # what they resolved to is below
        identity = {
            "model": resolved.name,
            "file": model_file,
            "adapters": [str(path) for path in source.adapters],
            "load": resolved.load.model_dump(mode="json"),
            "sampling": sampling.model_dump(mode="json"),
            "request": request,
            "kind": type(resolved.request).__name__,
            "choices": choices,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> list[Any] | None:
        items = self.entries.get(key)
        if items is not None:
            self.entries.move_to_end(key)
        return items

    def put(self, key: str, items: list[Any]) -> None:
        self.entries[key] = items
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


async def through_cache(
    cache: ResponseCache | None,
    metrics: ServeMetrics | None,
    resolved: Resolved[Any],
    n: int,
    serving: AsyncIterator[tuple[int, Any]],
) -> AsyncIterator[tuple[int, Any]]:
    """An exact repeat of a deterministic request from the cache; a whole new answer into it."""
    key = cache.key(resolved, n) if cache is not None else None
    hit = cache.get(key) if cache is not None and key is not None else None
    if hit is not None:
        await serving.aclose()  # never started: no slot, no runner
        record = current_request()
        if record is not None:
            record.from_cache, record.model, record.served_by = True, resolved.request.model, resolved.name
        if metrics is not None:
            metrics.cache_hits.labels(resolved.name).inc()
        for item in hit:
            yield item
        return
    kept: list[tuple[int, Any]] = []
    finished = 0
    try:
        async for item in serving:
            if cache is not None and key is not None:
                kept.append(item)
                finished += bool(item[1].done)
                if finished == n:  # stored before the last chunk goes out: a caller may stop reading after it
                    cache.put(key, kept)
            yield item
    finally:
        await serving.aclose()  # a caller that stops early frees the slot now, not when this is collected
