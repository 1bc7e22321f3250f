"""The store's full-text index (SQLite FTS5, kept in step with messages by triggers) and its embeddings.

`fts_query` turns free text into a safe FTS5 query; `MessageIndex` ranks messages by BM25 for the `selective`
strategy and keeps the embedding vectors it computes, one per message and model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ember.conversations.db import Database

_WORD = re.compile(r"\w+", re.UNICODE)
# Words too common to say what a message is about: left out of relevance queries (any_word), where every
# message containing "what" or "is" would otherwise count as related.
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "up",
        "us",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


def fts_query(text: str, *, any_word: bool) -> str | None:
    """A safe FTS5 query from free text: each word quoted (no operators reach FTS5), all or any of them."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(text)))[:64]
    if any_word:
        words = [word for word in words if word not in _STOPWORDS] or words
    if not words:
        return None
    return (" OR " if any_word else " ").join('"' + word.replace('"', '""') + '"' for word in words)


class MessageIndex:
    def __init__(self, db: Database) -> None:
        self.db = db

    def relevance(self, message_ids: Sequence[str], text: str) -> dict[str, float]:
        """BM25 relevance (higher is better) of the given messages to any word of `text`."""
        match = fts_query(text, any_word=True)
        if match is None or not message_ids:
            return {}
        marks = ", ".join("?" * len(message_ids))
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT m.id, bm25(messages_fts) FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid "
                f"WHERE messages_fts MATCH ? AND m.id IN ({marks})",
                (match, *message_ids),
            ).fetchall()
        return {message_id: -score for message_id, score in rows}  # FTS5's bm25() is lower for better matches

    def embeddings(self, message_ids: Sequence[str], model: str) -> dict[str, list[float]]:
        if not message_ids:
            return {}
        marks = ", ".join("?" * len(message_ids))
        with self.db.connect() as db:
            rows = db.execute(
                f"SELECT message_id, vector FROM message_embeddings WHERE model = ? AND message_id IN ({marks})",
                (model, *message_ids),
            ).fetchall()
        return {message_id: json.loads(vector) for message_id, vector in rows}

    def save_embeddings(self, model: str, vectors: dict[str, list[float]]) -> None:
        with self.db.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO message_embeddings (message_id, model, vector) VALUES (?, ?, ?)",
                [(message_id, model, json.dumps(vector)) for message_id, vector in vectors.items()],
            )
