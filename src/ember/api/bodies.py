"""Reading request bodies: JSON first, then a protocol model, every mistake a clear 400 in the route's shape.

The routes read their bodies themselves rather than through FastAPI's parameters, so that an invalid body
becomes ember's own error (Ollama's `{"error": ...}`, OpenAI's or Anthropic's error object) that names the
field; the protocol models still describe every field in the OpenAPI document (see schemas.py).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ember.errors import InvalidRequestError
from ember.serve.tracking import take_body_timeout

BodyT = TypeVar("BodyT", bound=BaseModel)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    take_body_timeout(value, request.app.state.settings.max_timeout)  # ember's "timeout", on every route
    return value


def validation_message(error: ValidationError) -> str:
    problems = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail["loc"]) or "body"
        message = detail["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "invalid request: " + "; ".join(problems)


def parse(model: type[BodyT], value: Any) -> BodyT:
    """A protocol model from a decoded body (or a WebSocket message), or a 400 naming each bad field."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise InvalidRequestError(validation_message(error)) from None


async def parse_body(request: Request, model: type[BodyT]) -> BodyT:
    return parse(model, await read_json(request))
