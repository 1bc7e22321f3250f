"""Documents for conversations (native routes; the page uses them, and so can any client).

    POST   /api/documents             multipart: one or more `file` parts, and `collection` or `conversation_id`
    GET    /api/documents?collection=&conversation_id=     the documents, and every collection's name
    GET    /api/documents/{id}        one document, with its text
    DELETE /api/documents/{id}

A conversation uses its own documents and those of the collections named in its metadata's `collections`
(PATCH /api/conversations/{id} {"metadata": {"collections": [...]}}). Its next answers cite them; see
conversations/sources.py for whole documents versus retrieved passages.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile

from ember.api.conversations import store_of
from ember.conversations.documents import MAX_DOCUMENT_BYTES, DocumentError, DocumentStore
from ember.errors import InvalidRequestError

router = APIRouter()
MAX_FILES = 20


def documents_of(request: Request) -> DocumentStore:
    return store_of(request).documents


@router.post("/api/documents")
async def upload(request: Request) -> dict[str, Any]:
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=8)
    except Exception as error:  # not multipart, or too many parts
        raise InvalidRequestError(
            f"send documents as multipart/form-data: `file` parts (at most {MAX_FILES}) and `collection` or "
            f"`conversation_id` ({error})"
        ) from None
    files = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
    if not files:
        raise InvalidRequestError("the form needs at least one `file` part")
    collection = _field(form.get("collection"))
    conversation_id = _field(form.get("conversation_id"))
    store = documents_of(request)
    added = []
    for part in files:
        data = await part.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise DocumentError(f"{part.filename} is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MB; split it")
        document = await asyncio.to_thread(
            store.add,
            part.filename or "document.txt",
            data,
            declared_type=part.content_type,
            collection=collection,
            conversation_id=conversation_id,
        )
        added.append(document.to_json())
    return {"documents": added}


def _field(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise InvalidRequestError("collection and conversation_id are text fields, not files")
    return value.strip()


@router.get("/api/documents")
async def listing(
    request: Request,
    collection: str | None = Query(None, max_length=80),
    conversation_id: str | None = Query(None, max_length=100),
) -> dict[str, Any]:
    store = documents_of(request)
    documents = await asyncio.to_thread(store.list, collection=collection, conversation_id=conversation_id)
    return {
        "documents": [document.to_json() for document in documents],
        "collections": await asyncio.to_thread(store.collections),
    }


@router.get("/api/documents/{document_id}")
async def one(request: Request, document_id: str) -> dict[str, Any]:
    store = documents_of(request)
    document = await asyncio.to_thread(store.get, document_id)
    return {"document": {**document.to_json(), "text": await asyncio.to_thread(store.text, document_id)}}


@router.delete("/api/documents/{document_id}")
async def delete(request: Request, document_id: str) -> dict[str, Any]:
    await asyncio.to_thread(documents_of(request).delete, document_id)
    return {"id": document_id, "deleted": True}
