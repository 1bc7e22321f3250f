"""llama-cpp-python's call shapes on top of ember: `llm(prompt, ...)` and `llm.create_chat_completion(...)`.

The guide's users write code against `llama_cpp.Llama`; these return the same OpenAI-style dicts, with
llama-cpp-python's defaults for each argument, so that code keeps working with `ember.Model`. Each call is a
native request through `Model.answer`, the path every other call takes, collected by `ember.collect`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ember.collect import AnswerCollector
from ember.errors import InvalidRequestError
from ember.logprobs import completion_logprobs
from ember.types import ChatRequest, GenerateRequest, build_request, to_messages

if TYPE_CHECKING:
    from ember.model import Model


# llama-cpp-python's argument names that are ember sampling options under another name (or the same one).
_RENAMED = {"max_tokens": "num_predict", "mirostat_mode": "mirostat"}
_SAMPLING_ARGUMENTS = (
    "max_tokens",
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "top_k",
    "stop",
    "seed",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "mirostat_mode",
    "mirostat_tau",
    "mirostat_eta",
)
_FINISH = {"stop": "stop", "length": "length"}


def _options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """ember's sampling options from the sampling arguments of a llama-cpp-python style call."""
    layer = {_RENAMED.get(name, name): arguments[name] for name in _SAMPLING_ARGUMENTS}
    max_tokens = layer["num_predict"]
    layer["num_predict"] = max_tokens if max_tokens is not None and max_tokens > 0 else -1
    layer["stop"] = layer["stop"] or ()
    layer["seed"] = -1 if layer["seed"] is None else layer["seed"]
    return layer


def _usage(final: Any) -> dict[str, int]:
    prompt = final.prompt_eval_count + final.prompt_cached_count
    return {"prompt_tokens": prompt, "completion_tokens": final.eval_count, "total_tokens": prompt + final.eval_count}


def create_completion(
    model: Model,
    prompt: str,
    *,
    max_tokens: int | None = 16,
    temperature: float = 0.8,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    echo: bool = False,
    stop: str | list[str] | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    top_k: int = 40,
    stream: bool = False,
    seed: int | None = None,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    suffix: str | None = None,
    logprobs: int | None = None,
    grammar: str | None = None,
) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """llama-cpp-python's `Llama.create_completion` (and `__call__`): a raw completion of the prompt, as a
    native generate request on the model (`suffix` fills in the middle on a model with FIM tokens)."""
    request = build_request(
        GenerateRequest,
        model=model.name,
        prompt=prompt,
        suffix=suffix or None,
        raw=True,
        truncate=False,
        options=_options(locals()),
        grammar=grammar,
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    chunks = model.answer(request)
    completion_id, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    start = len(prompt) if echo else 0

    def chunk(text: str, finish_reason: str | None, entries: Any = None, at: int = 0) -> dict[str, Any]:
        shaped = completion_logprobs(entries, at) if logprobs is not None else None
        choice = {"text": text, "index": 0, "logprobs": shaped, "finish_reason": finish_reason}
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": [choice],
        }

    def entries_of(part: Any) -> list[dict[str, Any]]:
        return [entry.model_dump() for entry in part.logprobs or ()]

    if stream:

        def parts() -> Iterator[dict[str, Any]]:
            offset = start
            if echo:
                yield chunk(prompt, None)
            for part in chunks:
                finish = _FINISH.get(part.done_reason or "stop", "stop") if part.done else None
                if part.response or part.done:
                    yield chunk(part.response, finish, entries_of(part), offset)
                offset += len(part.response)

        return parts()

    collector = AnswerCollector()
    for part in chunks:
        collector.add(part)
    answer = collector.result()
    result = chunk(
        (prompt if echo else "") + answer.response,
        _FINISH.get(answer.done_reason or "stop", "stop"),
        entries_of(answer),
        start,
    )
    result["usage"] = _usage(answer)
    return result


def create_chat_completion(
    model: Model,
    messages: list[dict[str, Any]],
    *,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    stream: bool = False,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    response_format: Mapping[str, Any] | None = None,
    max_tokens: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """llama-cpp-python's `Llama.create_chat_completion`, as a native chat request on the model."""
    request = build_request(
        ChatRequest,
        model=model.name,
        messages=to_messages(messages),
        truncate=False,
        options=_options(locals()),
        format=_format_of(response_format),
    )
    chunks = model.answer(request)
    header = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": model.name}

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**header, "object": "chat.completion.chunk", "choices": [choice]}

    if stream:

        def parts() -> Iterator[dict[str, Any]]:
            yield chunk({"role": "assistant"}, None)
            for part in chunks:
                if part.message.content:
                    yield chunk({"content": part.message.content}, None)
                if part.done:
                    yield chunk({}, _FINISH.get(part.done_reason or "stop", "stop"))

        return parts()

    collector = AnswerCollector()
    for part in chunks:
        collector.add(part)
    answer = collector.result()
    message = {"role": "assistant", "content": answer.message.content}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _FINISH.get(answer.done_reason or "stop", "stop"),
    }
    return {**header, "object": "chat.completion", "choices": [choice], "usage": _usage(answer)}


def _format_of(response_format: Mapping[str, Any] | None) -> str | dict[str, Any] | None:
    """OpenAI's response_format (and llama-cpp-python's json_object + schema) as Ollama's `format`."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return dict(schema) if schema else "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, Mapping):
            raise InvalidRequestError("response_format json_schema needs json_schema.schema, a JSON schema object")
        return dict(schema)
    raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, not {kind!r}")
