"""llama-cpp-python's call shapes on top of ember: `llm(prompt, ...)` and `llm.create_chat_completion(...)`.

The guide's users write code against `llama_cpp.Llama`; these return the same OpenAI-style dicts, with
llama-cpp-python's defaults for each argument, so that code keeps working with `ember.Model`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ember.engine.sequence import DoneReason, Sequence
from ember.errors import InvalidRequestError
from ember.prompt import grammar_for_format

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


def _sampling_layer(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """ember's sampling options from the sampling arguments of a llama-cpp-python style call."""
    layer = {_RENAMED.get(name, name): arguments[name] for name in _SAMPLING_ARGUMENTS}
    max_tokens = layer["num_predict"]
    layer["num_predict"] = max_tokens if max_tokens is not None and max_tokens > 0 else -1
    layer["stop"] = layer["stop"] or ()
    layer["seed"] = -1 if layer["seed"] is None else layer["seed"]
    return layer


def _finish_reason(sequence: Sequence) -> str | None:
    if sequence.done_reason is DoneReason.LENGTH:
        return "length"
    if sequence.done_reason is DoneReason.STOP:
        return "stop"
    return None


def _usage(sequence: Sequence) -> dict[str, int]:
    prompt = len(sequence.prompt_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": sequence.eval_count,
        "total_tokens": prompt + sequence.eval_count,
    }


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
    if suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported; put the text in the prompt")
    if logprobs:
        raise InvalidRequestError("logprobs are not available from ember.Model(...) calls yet")
    sampling = model.sampling(**_sampling_layer(locals()))
    loaded = model.loaded
    tokens = loaded.prompts.tokenize_prompt(prompt)
    updates = loaded.complete_tokens(tokens, sampling, grammar)
    completion_id = f"cmpl-{uuid.uuid4()}"
    created = int(time.time())

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        }

    if stream:

        def chunks() -> Iterator[dict[str, Any]]:
            if echo:
                yield chunk(prompt, None)
            for update in updates:
                if update.text:
                    yield chunk(update.text, None)
                if update.done:
                    yield chunk("", _finish_reason(update.sequence))

        return chunks()

    parts = [prompt] if echo else []
    last = None
    for update in updates:
        parts.append(update.text)
        last = update
    assert last is not None
    result = chunk("".join(parts), _finish_reason(last.sequence))
    result["usage"] = _usage(last.sequence)
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
    from ember.types import to_messages

    sampling = model.sampling(**_sampling_layer(locals()))
    loaded = model.loaded
    conversation = loaded.prompts.chat_messages(to_messages(messages), None)
    tokens = loaded.prompts.chat_tokens(conversation, num_ctx=loaded.options.num_ctx, sampling=sampling, truncate=False)
    updates = loaded.complete_tokens(tokens, sampling, grammar_for_format(_format_of(response_format)))
    completion_id = f"chatcmpl-{uuid.uuid4()}"
    created = int(time.time())
    header = {"id": completion_id, "created": created, "model": model.name}

    if stream:

        def chunks() -> Iterator[dict[str, Any]]:
            yield {
                **header,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
            }
            for update in updates:
                if update.text:
                    yield {
                        **header,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {"index": 0, "delta": {"content": update.text}, "logprobs": None, "finish_reason": None}
                        ],
                    }
                if update.done:
                    yield {
                        **header,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": _finish_reason(update.sequence),
                            }
                        ],
                    }

        return chunks()

    parts = []
    last = None
    for update in updates:
        parts.append(update.text)
        last = update
    assert last is not None
    return {
        **header,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "logprobs": None,
                "finish_reason": _finish_reason(last.sequence),
            }
        ],
        "usage": _usage(last.sequence),
    }


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
