"""The Responses API's records: which conversation a stored response belongs to, the messages it added and
answered with, and the response object as it was returned (GET /v1/responses/{id} gives it back as is)."""

from __future__ import annotations

import json
from typing import Any

from ember.conversations.db import Database, now
from ember.conversations.records import ConversationNotFoundError, check_id


class ResponseRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    def save(
        self, response_id: str, conversation_id: str, input_ids: list[str], output_ids: list[str], body: dict[str, Any]
    ) -> None:
        with self.db.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, conversation_id, input_ids, output_ids, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (response_id, conversation_id, json.dumps(input_ids), json.dumps(output_ids), json.dumps(body), now()),
            )

    def get(self, response_id: str) -> tuple[str, list[str], list[str], dict[str, Any]]:
        """(conversation id, input message ids, output message ids, the response as returned)."""
        check_id(response_id, "resp", "response")
        with self.db.connect() as db:
            row = db.execute(
                "SELECT conversation_id, input_ids, output_ids, body FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        if row is None:
            raise ConversationNotFoundError(f"no stored response {response_id!r}")
        return row[0], json.loads(row[1]), json.loads(row[2]), json.loads(row[3])

    def delete(self, response_id: str) -> None:
        check_id(response_id, "resp", "response")
        with self.db.transaction() as db:
            if db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount == 0:
                raise ConversationNotFoundError(f"no stored response {response_id!r}")
