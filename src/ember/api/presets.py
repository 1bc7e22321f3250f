"""Presets (personas): a named system prompt and options, stored by the server.

GET    /api/presets              all of them, by name
PUT    /api/presets/{name}       create or replace: {system, options, model}
DELETE /api/presets/{name}
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ember.api.ollama import manager_of
from ember.conversations.presets import PresetStore
from ember.store.resolve import resolve_model

router = APIRouter()


class PresetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, max_length=1_000_000, description="The system prompt it sets.")
    options: dict[str, Any] = Field(default_factory=dict, description="Load and sampling options it sets.")
    model: str | None = Field(None, max_length=200, description="The model it picks (none: keep the current one).")


def presets_of(request: Request) -> PresetStore:
    return PresetStore(request.app.state.conversations.store.db)


@router.get("/api/presets")
async def list_presets(request: Request) -> dict[str, Any]:
    presets = await asyncio.to_thread(presets_of(request).list)
    return {"presets": [preset.to_json() for preset in presets]}


@router.put("/api/presets/{name}")
async def put_preset(request: Request, name: str, body: PresetBody) -> dict[str, Any]:
    manager_of(request).limits.check_options(body.options)
    if body.model:
        await asyncio.to_thread(resolve_model, body.model)
    preset = await asyncio.to_thread(
        presets_of(request).put, name, system=body.system, options=body.options, model=body.model
    )
    return {"preset": preset.to_json()}


@router.delete("/api/presets/{name}")
async def delete_preset(request: Request, name: str) -> dict[str, Any]:
    await asyncio.to_thread(presets_of(request).delete, name)
    return {"name": name, "deleted": True}
