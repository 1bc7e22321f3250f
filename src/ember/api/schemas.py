"""Request body schemas for the OpenAPI document.

The routes read their JSON bodies themselves (so that every mistake becomes ember's own clear 400, in the
Ollama, OpenAI or Anthropic error shape), which leaves FastAPI nothing to describe. `model_body` puts a
protocol model's schema (every field, see the *_protocol.py modules) back into /openapi.json, for clients,
for documentation, and for schemathesis, which fuzzes the server with them; the few small native bodies
are written out here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    """A JSON schema with its local `$ref`s replaced by the definitions they point to (OpenAPI documents
    resolve `#/...` against the whole document, not the schema, so pydantic's `$defs` cannot stay)."""
    if isinstance(schema, dict):
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            return _inline(definitions[reference.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    return schema


def model_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return json_body(_inline(schema, schema.get("$defs", {})))


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is the given JSON schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or []}


_MODEL = {"type": "string", "examples": ["smollm2"]}
NAMED_MODEL = json_body(_object({"model": _MODEL}, ["model"]))
TOKENIZE = json_body(
    _object(
        {
            "model": _MODEL,
            "content": {"type": "string"},
            "add_special": {"type": "boolean"},
            "parse_special": {"type": "boolean"},
        },
        ["model", "content"],
    )
)
DETOKENIZE = json_body(
    _object({"model": _MODEL, "tokens": {"type": "array", "items": {"type": "integer"}}}, ["model", "tokens"])
)
PULL = json_body(_object({"model": {"type": "string"}, "stream": {"type": "boolean"}}, ["model"]))
CREATE = json_body(
    _object(
        {
            "model": {"type": "string"},
            "from": {"type": "string"},
            "system": {"type": "string"},
            "parameters": {"type": "object"},
            "stream": {"type": "boolean"},
        },
        ["model"],
    )
)
COPY = json_body(_object({"source": {"type": "string"}, "destination": {"type": "string"}}, ["source", "destination"]))
