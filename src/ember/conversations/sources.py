"""What a turn gives the model from its conversation's documents, and how the answer cites it.

Documents go in whole when all of them fit in half of the prompt's room; otherwise the passages most related
to the question do, found by hybrid retrieval: BM25 over the chunks' FTS5 index and cosine similarity of
embedding vectors (from /api/embed's path, the model manager; the conversation's embedding model, else its chat
model), fused by reciprocal rank (each list adds 1 / (RRF_K + rank)). Either way each source gets a number, the
system prompt lists them as [1], [2] ..., and the answer keeps them (info.sources) so a citation can show its text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ember.conversations.documents import Chunk, Document, DocumentStore
from ember.conversations.retrieval import cosine
from ember.errors import EmberError
from ember.types import EmbedRequest

log = logging.getLogger(__name__)
RRF_K = 60
CANDIDATES = 20  # per ranking, before fusion
PASSAGES = 4  # at most, in retrieval mode
INSTRUCTION = (  # worded so that even a small model writes the numbers
    "Answer from the sources. After each sentence that uses a source, write its number in brackets, like [1]."
)

Embed = Callable[..., Awaitable[Any]]
CountText = Callable[[str], int]


@dataclass
class Sources:
    mode: str  # "whole" or "retrieval"
    items: list[dict[str, Any]] = field(default_factory=list)  # {n, document_id, name, chunk_id?, text}
    reason: str = ""

    def system_block(self) -> str:
        listed = "\n\n".join(f"[{item['n']}] {item['name']}: {item['text']}" for item in self.items)
        return f"{INSTRUCTION}\n\nSources:\n{listed}"

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "count": len(self.items)}


def collections_of(metadata: dict[str, Any]) -> list[str]:
    names = metadata.get("collections") or []
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def fuse(rankings: list[list[str]], k: int = RRF_K) -> list[str]:
    """Reciprocal rank fusion: ids by the sum of 1 / (k + rank) over the rankings they appear in."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])


async def gather_sources(
    store: DocumentStore,
    conversation_id: str,
    collections: list[str],
    query: str,
    *,
    room: int,
    count_text: CountText,
    embed: Embed | None,
    embedding_model: str | None,
    timeout: float | None = None,
) -> Sources | None:
    """The sources for one turn, or None when the conversation has no documents. `room` is the prompt's budget
    in tokens; the documents may take half of it."""
    documents = await asyncio.to_thread(store.in_scope, conversation_id, collections)
    if not documents:
        return None
    texts = [await asyncio.to_thread(store.text, document.id) for document in documents]
    whole_tokens = sum([await asyncio.to_thread(count_text, text) for text in texts])
    share = room // 2
    if whole_tokens <= share:
        items = [
            {"n": n, "document_id": document.id, "name": document.name, "text": text}
            for n, (document, text) in enumerate(zip(documents, texts, strict=True), start=1)
        ]
        return Sources("whole", items, f"{_count(documents)} ({whole_tokens} tokens) given whole")
    chunks = await asyncio.to_thread(store.chunks, [document.id for document in documents])
    ranked = await _ranked(store, chunks, query, embed, embedding_model, timeout)
    items, used = [], 0
    by_id = {chunk.id: chunk for chunk in chunks}
    for chunk_id in ranked:
        chunk = by_id[chunk_id]
        tokens = await asyncio.to_thread(count_text, chunk.text)
        if used + tokens > share:
            continue
        items.append(_passage(len(items) + 1, chunk))
        used += tokens
        if len(items) == PASSAGES:
            break
    reason = (
        f"{_count(documents)} ({whole_tokens} tokens) do not fit half of the {room}-token prompt room; "
        f"the {len(items)} passages most related to the question were given instead"
    )
    return Sources("retrieval", items, reason)


def _count(documents: list[Document]) -> str:
    return "1 document" if len(documents) == 1 else f"{len(documents)} documents"


def _passage(n: int, chunk: Chunk) -> dict[str, Any]:
    return {"n": n, "document_id": chunk.document_id, "name": chunk.name, "chunk_id": chunk.id, "text": chunk.text}


async def _ranked(
    store: DocumentStore,
    chunks: list[Chunk],
    query: str,
    embed: Embed | None,
    model: str | None,
    timeout: float | None,
) -> list[str]:
    ids = [chunk.id for chunk in chunks]
    document_ids = list(dict.fromkeys(chunk.document_id for chunk in chunks))
    rankings = [await asyncio.to_thread(store.bm25, document_ids, query, CANDIDATES)]
    if embed is not None and model:
        try:
            rankings.append(await _by_vectors(store, chunks, query, embed, model, timeout))
        except EmberError as error:  # the passages BM25 found still answer; say why vectors did not help
            log.warning("document vectors from %s failed (%s); BM25 alone ranks the passages", model, error)
    fused = fuse(rankings)
    return fused + [chunk_id for chunk_id in ids if chunk_id not in set(fused)]  # then in document order


async def _by_vectors(
    store: DocumentStore, chunks: list[Chunk], query: str, embed: Embed, model: str, timeout: float | None
) -> list[str]:
    known = await asyncio.to_thread(store.embeddings, [chunk.id for chunk in chunks], model)
    missing = [chunk for chunk in chunks if chunk.id not in known]
    response = await embed(
        EmbedRequest(model=model, input=[query] + [chunk.text for chunk in missing], truncate=True),
        priority="low",
        timeout=timeout,
    )
    query_vector, *fresh = response.embeddings
    new = {chunk.id: vector for chunk, vector in zip(missing, fresh, strict=True)}
    if new:
        await asyncio.to_thread(store.save_embeddings, model, new)
    vectors = {**known, **new}
    scores = {chunk_id: cosine(query_vector, vector) for chunk_id, vector in vectors.items()}
    return sorted(scores, key=lambda chunk_id: -scores[chunk_id])[:CANDIDATES]
