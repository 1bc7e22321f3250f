"""Presets: a named system prompt with options (and optionally a model), kept in ember.db. The page offers
them as personas; any client can list and set them through /api/presets."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ember.conversations.db import Database, now
from ember.conversations.records import ConversationNotFoundError
from ember.errors import InvalidRequestError

_NAME = re.compile(r"[\w][\w .,:()'+-]{0,79}", re.UNICODE)


@dataclass
class Preset:
    name: str
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "system": self.system,
            "options": self.options,
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def check_preset_name(name: str) -> str:
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"preset name {name!r}: use 1 to 80 letters, digits, spaces and . , : ( ) ' + - (starting with a letter "
            "or digit)"
        )
    return name


class PresetStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def list(self) -> list[Preset]:
        with self.db.connect() as db:
            rows = db.execute(
                "SELECT name, system, options, model, created_at, updated_at FROM presets ORDER BY name COLLATE NOCASE"
            ).fetchall()
        return [_preset(row) for row in rows]

    def get(self, name: str) -> Preset:
        with self.db.connect() as db:
            row = db.execute(
                "SELECT name, system, options, model, created_at, updated_at FROM presets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no preset named {name!r}")
        return _preset(row)

    def put(self, name: str, *, system: str | None, options: dict[str, Any], model: str | None) -> Preset:
        name = check_preset_name(name)
        stamp = now()
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO presets (name, system, options, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET system = excluded.system, options = excluded.options, "
                "model = excluded.model, updated_at = excluded.updated_at",
                (name, system, json.dumps(options, sort_keys=True), model, stamp, stamp),
            )
        return self.get(name)

    def delete(self, name: str) -> None:
        with self.db.transaction() as db:
            if db.execute("DELETE FROM presets WHERE name = ?", (name,)).rowcount == 0:
                raise ConversationNotFoundError(f"no preset named {name!r}")


def _preset(row: tuple[Any, ...]) -> Preset:
    name, system, options, model, created_at, updated_at = row
    return Preset(name, system, json.loads(options), model, created_at, updated_at)
