"""OpenAI's Files and Batches APIs: /v1/files and /v1/batches, as the `openai` SDK calls them.

Uploads are multipart (`file`, `purpose=batch`, optional `expires_after[anchor]` and `expires_after[seconds]`),
streamed to disk with their own size limit (EMBER_MAX_FILE_BYTES); every line of a batch input is checked
at upload, and a bad file is refused with a 400 that lists the problems by line number. The objects returned
(File, Batch, the lists) have OpenAI's fields and meanings; see ember.jobs for how batches run and resume.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ember.api.bodies import read_json
from ember.errors import InvalidRequestError
from ember.jobs.batch_input import decode_text, parse_openai_jsonl
from ember.jobs.batch_service import BatchService
from ember.jobs.files import PURPOSES

router = APIRouter()
_CHUNK = 1024 * 1024


def service_of(request: Request) -> BatchService:
    return request.app.state.batches


def create_batch_service(manager: Any, settings: Any) -> BatchService:
    from ember.api.openai_calls import native_call

    return BatchService(manager, settings, native_call)


def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer, not {value!r}") from None


# --- files -------------------------------------------------------------------------------------------------


def _expiry(form: Any) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError('expires_after[anchor] must be "created_at"')
    value = _int(seconds, "expires_after[seconds]", 0)
    if not 3600 <= value <= 30 * 24 * 3600:
        raise InvalidRequestError("expires_after[seconds] must be from 3600 (1 hour) to 2592000 (30 days)")
    return int(time.time()) + value


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as error:  # a body that is not multipart, or too many parts
        raise InvalidRequestError(f"send the file as multipart/form-data with `file` and `purpose` ({error})") from None
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError("the form needs a `file` part holding the JSONL file")
    if purpose != "batch":
        raise InvalidRequestError(f"purpose must be batch (ember keeps batch input files), not {purpose!r}")
    expires_at = _expiry(form)
    files = service_of(request).files
    fd, temporary = files.temporary()
    try:
        size = 0
        with os.fdopen(fd, "wb") as writer:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > settings.max_file_bytes:
                    raise InvalidRequestError(
                        f"the file is larger than this server's limit of {settings.max_file_bytes} bytes "
                        "(EMBER_MAX_FILE_BYTES); split it into several batches"
                    )
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        filename = os.path.basename(upload.filename or "input.jsonl")

        def check_and_store() -> dict[str, Any]:
            parse_openai_jsonl(decode_text(temporary.read_bytes(), filename), source=filename)  # 400 by line
            return files.add(temporary, filename=filename, purpose="batch", expires_at=expires_at)

        return await asyncio.to_thread(check_and_store)
    finally:
        temporary.unlink(missing_ok=True)
        await upload.close()


@router.get("/v1/files")
async def list_files(request: Request) -> dict[str, Any]:
    query = request.query_params
    purpose = query.get("purpose") or None
    if purpose is not None and purpose not in PURPOSES:
        raise InvalidRequestError(f"purpose must be one of {', '.join(PURPOSES)}")
    items, has_more = await asyncio.to_thread(
        service_of(request).files.list,
        purpose=purpose,
        limit=_int(query.get("limit"), "limit", 10000),
        order=query.get("order") or "desc",
        after=query.get("after") or None,
    )
    return _page(items, has_more)


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(service_of(request).files.get, file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> FileResponse:
    path = await asyncio.to_thread(service_of(request).files.content_path, file_id)
    return FileResponse(path, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(service_of(request).files.delete, file_id)


# --- batches -----------------------------------------------------------------------------------------------


@router.post("/v1/batches")
async def create_batch(request: Request) -> dict[str, Any]:
    return await service_of(request).create(await read_json(request))


@router.get("/v1/batches")
async def list_batches(request: Request) -> dict[str, Any]:
    query = request.query_params
    items, has_more = await asyncio.to_thread(
        service_of(request).batches.list, after=query.get("after") or None, limit=_int(query.get("limit"), "limit", 20)
    )
    return _page(items, has_more)


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(service_of(request).batches.get, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return await service_of(request).cancel(batch_id)
