"""Native requests as OpenAI request bodies, and OpenAI stream chunks back as native response chunks.

Only the options a request or the model's Modelfile sets are sent: the upstream's own defaults (vLLM reads
the model's generation_config) apply to the rest, as chat templates are the upstream's business too.
Sampling options go by OpenAI's names, plus the extensions vLLM and TensorRT-LLM read (`top_k`, `min_p`,
`repetition_penalty` for ember's `repeat_penalty`). Those no upstream has (mirostat, typical_p) are a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.errors import InvalidRequestError
from ember.options import SAMPLING_OPTION_NAMES, resolve_options
from ember.store.resolve import ModelSource
from ember.types import ChatRequest, GenerateRequest, Message, TokenLogprob, ToolCall, ToolCallFunction, TopLogprob

# ember's name -> the body field. Options not listed (num_keep, repeat_last_n, load options) mean nothing upstream.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
}
_UNSUPPORTED = {"mirostat": 0, "typical_p": 1.0}  # an upstream has no such sampler: only its "off" value is fine


def sampling_fields(source: ModelSource, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The body fields of the sampling options the Modelfile (PARAMETER) or the request set."""
    own = {k: v for k, v in source.parameters.items() if k in SAMPLING_OPTION_NAMES}
    asked = {k: v for k, v in (options or {}).items() if v is not None and k in SAMPLING_OPTION_NAMES}
    _, sampling = resolve_options(own, asked)
    given = set(own) | set(asked)
    for name, off in _UNSUPPORTED.items():
        if name in given and getattr(sampling, name) != off:
            raise InvalidRequestError(f"{name} is not available on upstream models (OpenAI-compatible servers lack it)")
    body: dict[str, Any] = {}
    for name, wire in _SAMPLING_FIELDS.items():
        if name in given:
            body[wire] = getattr(sampling, name)
    if "seed" in given and sampling.seed >= 0:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if "num_predict" in given and sampling.num_predict > 0:
        body["max_tokens"] = sampling.num_predict
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    return body


def _format_fields(answer_format: Any, grammar: str | None) -> dict[str, Any]:
    if grammar:
        raise InvalidRequestError("a GBNF grammar is not available on upstream models; use format (a JSON schema)")
    if answer_format in (None, ""):
        return {}
    if answer_format == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(answer_format, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer_format}}}
    raise InvalidRequestError(f'format must be "json" or a JSON schema, not {answer_format!r}')


def _wire_message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id or f"call_{index}",
                "type": "function",
                "function": {"name": call.function.name, "arguments": json.dumps(call.function.arguments)},
            }
            for index, call in enumerate(message.tool_calls)
        ]
    if message.role == "tool":
        if message.tool_call_id:
            wire["tool_call_id"] = message.tool_call_id
        if message.tool_name:
            wire["name"] = message.tool_name
    return wire


def _with_defaults(source: ModelSource, messages: list[Message], system: str | None = None) -> list[Message]:
    """The Modelfile's MESSAGE seeds and SYSTEM prompt put in place, as a local model's prompt has them."""
    seeds = [Message.model_validate(dict(seed)) for seed in source.messages]
    system = system if system is not None else source.system
    conversation = [*seeds, *messages]
    if system and not any(message.role == "system" for message in conversation):
        conversation.insert(0, Message(role="system", content=system))
    return conversation


def _stream_fields(n: int) -> dict[str, Any]:
    return {"stream": True, "stream_options": {"include_usage": True}, **({"n": n} if n > 1 else {})}


def chat_body(source: ModelSource, model: str, request: ChatRequest, n: int) -> dict[str, Any]:
    """POST /v1/chat/completions for a native chat request."""
    if request.continue_final:
        raise InvalidRequestError("continue_final is not available on upstream models")
    messages = _with_defaults(source, list(request.messages))
    body: dict[str, Any] = {"model": model, "messages": [_wire_message(m) for m in messages], **_stream_fields(n)}
    body.update(sampling_fields(source, request.options))
    body.update(_format_fields(request.format, request.grammar))
    if request.think is not None:  # Qwen3-style templates on vLLM and TensorRT-LLM read enable_thinking
        body["chat_template_kwargs"] = {"enable_thinking": request.think is not False}
    if request.tools:
        body["tools"] = request.tools
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    return body


def generate_body(source: ModelSource, model: str, request: GenerateRequest, n: int) -> tuple[str, dict[str, Any]]:
    """(path, body) for a native generate request: a templated one is a chat turn (the upstream applies its
    template), a raw one (OpenAI's /v1/completions) a text completion."""
    if request.suffix:
        raise InvalidRequestError("insertion (suffix) is not available on upstream models")
    fields = {**sampling_fields(source, request.options), **_format_fields(request.format, request.grammar)}
    if not request.raw:
        if request.context:
            raise InvalidRequestError("context (tokens of an earlier answer) is not available on upstream models")
        messages = _with_defaults(source, [Message(role="user", content=request.prompt)], request.system)
        body = {"model": model, "messages": [_wire_message(m) for m in messages], **_stream_fields(n), **fields}
        if request.logprobs:
            body.update({"logprobs": True, **({"top_logprobs": request.top_logprobs} if request.top_logprobs else {})})
        return "/chat/completions", body
    if request.context and request.prompt:
        raise InvalidRequestError("send a raw prompt as text or as token ids, not both, to an upstream model")
    prompt: str | list[int] = list(request.context) if request.context else request.prompt
    body = {"model": model, "prompt": prompt, **_stream_fields(n), **fields}
    if request.logprobs:
        body["logprobs"] = request.top_logprobs or 1
    return "/completions", body


@dataclass
class ChoiceState:
    """What one choice's stream has said so far: its calls arrive in pieces, its end before the usage chunk."""

    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: str | None = None
    stop_sequence: str | None = None
    chunks: int = 0  # text chunks: each is about one token on vLLM

    def tool_calls(self) -> list[ToolCall]:
        calls = []
        for position, (_, call) in enumerate(sorted(self.calls.items())):
            text = call.get("arguments") or "{}"
            try:
                arguments = json.loads(text)
            except ValueError:
                arguments = {"arguments": text}  # as written, when the model's JSON is broken
            if not isinstance(arguments, dict):
                arguments = {"value": arguments}
            function = ToolCallFunction(name=call.get("name", ""), arguments=arguments, index=position)
            calls.append(ToolCall(function=function, id=call.get("id")))
        return calls


def add_tool_call_parts(state: ChoiceState, parts: list[dict[str, Any]]) -> None:
    for part in parts:
        index = int(part.get("index", len(state.calls)))
        call = state.calls.setdefault(index, {})
        if part.get("id"):
            call["id"] = part["id"]
        function = part.get("function") or {}
        if function.get("name"):
            call["name"] = call.get("name", "") + function["name"]
        if function.get("arguments"):
            call["arguments"] = call.get("arguments", "") + function["arguments"]


def done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def chat_logprobs(choice: Mapping[str, Any]) -> list[TokenLogprob] | None:
    """OpenAI chat logprobs ({"content": [{token, logprob, bytes, top_logprobs}]}) as native entries."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        TokenLogprob(
            token=entry.get("token", ""),
            logprob=float(entry.get("logprob", 0.0)),
            bytes=entry.get("bytes"),
            top_logprobs=[
                TopLogprob(token=top.get("token", ""), logprob=float(top.get("logprob", 0.0)), bytes=top.get("bytes"))
                for top in entry.get("top_logprobs") or []
            ],
        )
        for entry in content
    ]


def completion_logprobs(choice: Mapping[str, Any]) -> list[TokenLogprob] | None:
    """Legacy completions logprobs ({tokens, token_logprobs, top_logprobs: [{token: logprob}]}) as native ones."""
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    if not tokens:
        return None
    entries = []
    for index, token in enumerate(tokens):
        top = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        value = values[index] if index < len(values) and values[index] is not None else 0.0
        entries.append(
            TokenLogprob(
                token=token,
                logprob=float(value),
                top_logprobs=[TopLogprob(token=t, logprob=float(lp)) for t, lp in top.items()],
            )
        )
    return entries


def error_message(payload: Any, fallback: str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"error": "..."}, or FastAPI's
    {"detail"}), else `fallback`."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error:
            return error
    return fallback
