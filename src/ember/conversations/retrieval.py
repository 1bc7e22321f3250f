"""Relevance of older messages to the newest, for the `selective` strategy.

BM25 over the store's FTS5 index by default; cosine similarity of embeddings when the conversation names an
embedding model (vectors are computed once per message and model, through the model manager at low priority,
and kept in the store).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from ember.conversations.context import Entry
from ember.conversations.store import ConversationStore
from ember.types import EmbedRequest


class Ranker:
    def __init__(
        self,
        store: ConversationStore,
        *,
        embed: Callable[..., Any] | None = None,
        embedding_model: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.store = store
        self.embed = embed
        self.embedding_model = embedding_model
        self.timeout = timeout

    async def __call__(self, entries: list[Entry], query: str) -> dict[str, float]:
        if self.embedding_model and self.embed is not None:
            return await self._by_embeddings(entries, query)
        return await asyncio.to_thread(self.store.index.relevance, [entry.id for entry in entries], query)

    async def _by_embeddings(self, entries: list[Entry], query: str) -> dict[str, float]:
        model = self.embedding_model or ""
        known = await asyncio.to_thread(self.store.index.embeddings, [entry.id for entry in entries], model)
        missing = [entry for entry in entries if entry.id not in known and entry.message.content.strip()]
        texts = [query] + [entry.message.content for entry in missing]
        response = await self.embed(
            EmbedRequest(model=model, input=texts, truncate=True), priority="low", timeout=self.timeout
        )
        query_vector, *fresh = response.embeddings
        vectors = dict(known)
        new = {entry.id: vector for entry, vector in zip(missing, fresh, strict=True)}
        if new:
            await asyncio.to_thread(self.store.index.save_embeddings, model, new)
        vectors.update(new)
        return {entry_id: cosine(query_vector, vector) for entry_id, vector in vectors.items()}


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
