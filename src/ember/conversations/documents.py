"""Documents given to conversations: text, Markdown, HTML and PDF files, as text in chunks, in ember.db.

A document belongs to one conversation or to a named collection (which conversations attach by name, in their
metadata's `collections`). Its text is cut into chunks of about CHUNK_CHARS characters that overlap by
OVERLAP_CHARS, so that a sentence cut at a chunk's edge is whole in its neighbour; chunks are indexed by FTS5
(kept in step by triggers) and get embedding vectors when a turn first ranks them (sources.py).
"""

from __future__ import annotations

import html.parser
import io
import json
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from ember.conversations.db import Database, new_id, now
from ember.conversations.index import fts_query
from ember.conversations.records import ConversationNotFoundError, check_id
from ember.errors import InvalidRequestError

CHUNK_CHARS = 800
OVERLAP_CHARS = 160
MAX_DOCUMENT_BYTES = 20 * 1024 * 1024
_COLLECTION = re.compile(r"[\w][\w .:+-]{0,79}", re.UNICODE)
_DOCUMENT_ID = re.compile(r"doc_[0-9a-f]{24}")
_KINDS = {  # extension -> media type
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}


class DocumentError(InvalidRequestError):
    """A file that cannot be read as a document (type, size, damage)."""


@dataclass
class Document:
    id: str
    name: str
    media_type: str
    size: int
    collection: str | None
    conversation_id: str | None
    chunks: int
    tokens: int  # an estimate (characters / 4) until a model counts them
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "media_type": self.media_type,
            "size": self.size,
            "collection": self.collection,
            "conversation_id": self.conversation_id,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Chunk:
    id: str
    document_id: str
    name: str  # the document's
    seq: int
    text: str


def check_collection(name: str) -> str:
    name = name.strip()
    if not _COLLECTION.fullmatch(name):
        raise InvalidRequestError(
            f"collection name {name!r}: use 1 to 80 letters, digits, spaces and . : + - (starting with a letter or "
            "digit)"
        )
    return name


def check_document_id(value: str) -> str:
    if not _DOCUMENT_ID.fullmatch(value):
        raise ConversationNotFoundError(f"no document {value!r}: ids look like doc_ and 24 hex digits")
    return value


def media_type_of(filename: str, declared: str | None) -> str:
    kind = _KINDS.get(PurePath(filename).suffix.lower())
    if kind is None and declared:
        declared = declared.split(";")[0].strip().lower()
        kind = declared if declared in _KINDS.values() else None
    if kind is None:
        raise DocumentError(
            f"{filename}: ember reads text (.txt), Markdown (.md), HTML (.html) and PDF (.pdf) documents; "
            "convert it to one of these"
        )
    return kind


def extract_text(data: bytes, media_type: str, filename: str) -> str:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{filename} is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MB; split it")
    if media_type == "application/pdf":
        text = _pdf_text(data, filename)
    else:
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        if media_type == "text/html":
            text = html_text(text)
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if not text:
        raise DocumentError(f"{filename} has no text to read (a scanned PDF needs OCR first)")
    return text


def _pdf_text(data: bytes, filename: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as error:
        raise DocumentError(f"{filename} is not a readable PDF: {error}") from None


class _HtmlText(html.parser.HTMLParser):
    """The readable text of a page: no script, style or head; block elements end lines."""

    SKIP = frozenset({"script", "style", "head", "noscript", "template", "svg"})
    BLOCKS = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "table"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(source: str) -> str:
    parser = _HtmlText()
    parser.feed(source)
    parser.close()
    return re.sub(r"[ \t]+", " ", "".join(parser.parts))


def chunk_text(text: str, size: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS) -> list[tuple[int, str]]:
    """(start offset, text) of overlapping chunks, cut at a paragraph, line or word boundary when one is near."""
    chunks: list[tuple[int, str]] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            window = text[start + size // 2 : end]
            for boundary in ("\n\n", "\n", ". ", " "):
                cut = window.rfind(boundary)
                if cut >= 0:
                    end = start + size // 2 + cut + len(boundary)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append((start, piece))
        if end >= len(text):
            break
        start = max(start + 1, end - overlap)
        while start < end and not text[start - 1].isspace():  # begin the next chunk at a word
            start += 1
    return chunks


class DocumentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        name: str,
        data: bytes,
        *,
        declared_type: str | None = None,
        collection: str | None = None,
        conversation_id: str | None = None,
    ) -> Document:
        if (collection is None) == (conversation_id is None):
            raise InvalidRequestError("give a document either a collection or a conversation_id, not both or neither")
        if collection is not None:
            collection = check_collection(collection)
        name = PurePath(name or "document.txt").name[:200]
        media_type = media_type_of(name, declared_type)
        text = extract_text(data, media_type, name)
        document_id, stamp = new_id("doc"), now()
        chunks = chunk_text(text)
        with self.db.transaction() as db:
            if conversation_id is not None:
                check_id(conversation_id, "conv", "conversation")
                if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                    raise ConversationNotFoundError(f"no conversation {conversation_id!r}")
            db.execute(
                "INSERT INTO documents (id, collection, conversation_id, name, media_type, size, text, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (document_id, collection, conversation_id, name, media_type, len(data), text, stamp),
            )
            db.executemany(
                "INSERT INTO document_chunks (id, document_id, seq, text, start) VALUES (?, ?, ?, ?, ?)",
                [(new_id("chunk"), document_id, seq, piece, start) for seq, (start, piece) in enumerate(chunks)],
            )
        return self.get(document_id)

    def _select(self, where: str, parameters: tuple[Any, ...]) -> list[Document]:
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT d.id, d.name, d.media_type, d.size, d.collection, d.conversation_id, "
                "(SELECT COUNT(*) FROM document_chunks c WHERE c.document_id = d.id), length(d.text), d.created_at "
                f"FROM documents d WHERE {where} ORDER BY d.created_at",
                parameters,
            ).fetchall()
        return [
            Document(row[0], row[1], row[2], row[3], row[4], row[5], row[6], (row[7] + 3) // 4, row[8]) for row in rows
        ]

    def get(self, document_id: str) -> Document:
        found = self._select("d.id = ?", (check_document_id(document_id),))
        if not found:
            raise ConversationNotFoundError(f"no document {document_id!r}")
        return found[0]

    def text(self, document_id: str) -> str:
        with self.db.connect() as db:
            row = db.execute("SELECT text FROM documents WHERE id = ?", (check_document_id(document_id),)).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no document {document_id!r}")
        return row[0]

    def list(self, *, collection: str | None = None, conversation_id: str | None = None) -> list[Document]:
        if collection is not None:
            return self._select("d.collection = ?", (collection,))
        if conversation_id is not None:
            return self._select("d.conversation_id = ?", (conversation_id,))
        return self._select("1", ())

    def collections(self) -> list[str]:
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT DISTINCT collection FROM documents WHERE collection IS NOT NULL ORDER BY collection"
            ).fetchall()
        return [row[0] for row in rows]

    def delete(self, document_id: str) -> None:
        with self.db.transaction() as db:
            if db.execute("DELETE FROM documents WHERE id = ?", (check_document_id(document_id),)).rowcount == 0:
                raise ConversationNotFoundError(f"no document {document_id!r}")

    # --- for a turn ----------------------------------------------------------------------------------

    def in_scope(self, conversation_id: str, collections: list[str]) -> list[Document]:
        """The documents a conversation uses: its own and those of the collections it attaches."""
        marks = ", ".join("?" * len(collections)) or "NULL"
        return self._select(f"d.conversation_id = ? OR d.collection IN ({marks})", (conversation_id, *collections))

    def chunks(self, document_ids: list[str]) -> list[Chunk]:
        if not document_ids:
            return []
        marks = ", ".join("?" * len(document_ids))
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT c.id, c.document_id, d.name, c.seq, c.text FROM document_chunks c "
                f"JOIN documents d ON d.id = c.document_id WHERE c.document_id IN ({marks}) "
                "ORDER BY d.created_at, c.seq",
                document_ids,
            ).fetchall()
        return [Chunk(*row) for row in rows]

    def bm25(self, document_ids: list[str], query: str, limit: int) -> list[str]:
        """Chunk ids of those documents, best BM25 match first (any word of the query)."""
        match = fts_query(query, any_word=True)
        if match is None or not document_ids:
            return []
        marks = ", ".join("?" * len(document_ids))
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT c.id FROM chunks_fts JOIN document_chunks c ON c.rowid = chunks_fts.rowid "
                f"WHERE chunks_fts MATCH ? AND c.document_id IN ({marks}) ORDER BY bm25(chunks_fts) LIMIT ?",
                (match, *document_ids, limit),
            ).fetchall()
        return [row[0] for row in rows]

    def embeddings(self, chunk_ids: list[str], model: str) -> dict[str, list[float]]:
        if not chunk_ids:
            return {}
        marks = ", ".join("?" * len(chunk_ids))
        with self.db.connect() as db:
            rows = db.execute(
                f"SELECT chunk_id, vector FROM chunk_embeddings WHERE model = ? AND chunk_id IN ({marks})",
                (model, *chunk_ids),
            ).fetchall()
        return {chunk_id: json.loads(vector) for chunk_id, vector in rows}

    def save_embeddings(self, model: str, vectors: dict[str, list[float]]) -> None:
        with self.db.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO chunk_embeddings (chunk_id, model, vector) VALUES (?, ?, ?)",
                [(chunk_id, model, json.dumps(vector)) for chunk_id, vector in vectors.items()],
            )
