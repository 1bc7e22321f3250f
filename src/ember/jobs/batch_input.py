"""Batch input: OpenAI batch JSONL, JSONL or CSV of prompts, and text files, as a list of batch lines.

Every input becomes the same thing: a `BatchLine` holding an OpenAI request (`custom_id`, `url`, `body`), so
one runner serves them all and the output is OpenAI's batch output whatever the input was. Prompts become chat
completion bodies with the sampling options given on the command line, overridden by the line's own.

Errors name the file and line and say what is wrong; all of a file's problems are reported at once (up to a
limit), so a user fixes them in one pass.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import InvalidRequestError

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID = 512
_SHOWN_PROBLEMS = 20

# Per-line (and command-line) options by Ollama's name -> the OpenAI body field that carries them. The last
# ones are llama.cpp server's extensions, which ember's OpenAI routes take too.
_OPTION_FIELDS = {
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_last_n": "repeat_last_n",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
_PROMPT_FIELDS = {"prompt", "messages", "system", "custom_id", "id", "model", "options"}


class BatchInputError(InvalidRequestError):
    """An input file has lines that cannot run; `problems` holds (line number, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[int, str]]) -> None:
        shown = "; ".join(f"line {line}: {message}" for line, message in problems[:_SHOWN_PROBLEMS])
        more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        super().__init__(f"{source} has {len(problems)} invalid line(s): {shown}{more}")
        self.source = source
        self.problems = problems


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch, in input order."""

    index: int  # position in the whole batch (all inputs), from 0
    custom_id: str
    url: str
    body: dict[str, Any]
    source: str = ""  # the input file, for per-file output
    line: int = 0  # where in that file, from 1
    prompt: str | None = None  # the prompt as the user gave it, for the per-file JSON output

    def request(self) -> dict[str, Any]:
        """The line as OpenAI's batch input JSONL has it."""
        return {"custom_id": self.custom_id, "method": "POST", "url": self.url, "body": self.body}


@dataclass
class PromptDefaults:
    """What the command line gives every prompt: model, system prompt, sampling options (Ollama's names)."""

    model: str
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model_override: bool = False  # -m was given: it replaces the model named in OpenAI lines too


# --- OpenAI batch JSONL ------------------------------------------------------------------------------------


def _openai_line(value: Any, seen: set[str]) -> tuple[str, str, dict[str, Any]]:
    """custom_id, url and body of one parsed line; raises ValueError with what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("each line must be a JSON object with custom_id, method, url and body")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise ValueError(f"custom_id is longer than {MAX_CUSTOM_ID} characters")
    if custom_id in seen:
        raise ValueError(f"custom_id {custom_id!r} is used twice; each line needs its own")
    method = value.get("method", "POST")
    if method != "POST":
        raise ValueError(f"method must be POST, not {method!r}")
    url = value.get("url")
    if url not in SUPPORTED_URLS:
        raise ValueError(f"url must be one of {', '.join(SUPPORTED_URLS)}, not {url!r}")
    body = value.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object (the request to the url)")
    unknown = set(value) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}: a line has custom_id, method, url, body")
    seen.add(custom_id)
    return custom_id, url, body


def parse_openai_jsonl(text: str, *, source: str = "input", start: int = 0) -> list[BatchLine]:
    """The lines of an OpenAI batch input file; every line is checked, all problems reported by line number."""
    lines: list[BatchLine] = []
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            problems.append((number, f"not valid JSON ({error.msg} at column {error.colno})"))
            continue
        try:
            custom_id, url, body = _openai_line(value, seen)
        except ValueError as error:
            problems.append((number, str(error)))
            continue
        lines.append(BatchLine(start + len(lines), custom_id, url, body, source, number, _prompt_of(url, body)))
    if problems:
        raise BatchInputError(source, problems)
    if not lines:
        raise BatchInputError(source, [(1, "the file has no requests")])
    return lines


def decode_text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(f"{source} is not UTF-8 text (byte {error.start})") from None


def _prompt_of(url: str, body: Mapping[str, Any]) -> str | None:
    """The text a person would call the prompt of a request: the last user message, the prompt or the input."""
    if url == "/v1/chat/completions":
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
        return None
    value = body.get("prompt") if url == "/v1/completions" else body.get("input")
    return value if isinstance(value, str) else None


# --- prompts -----------------------------------------------------------------------------------------------


def prompt_body(
    defaults: PromptDefaults, prompt: str | None = None, messages: list[Any] | None = None, **line: Any
) -> dict[str, Any]:
    """A chat completion body for a prompt (or messages), the defaults under the line's own values."""
    options = {**defaults.options, **_line_options(line)}
    system = line.get("system", defaults.system)
    if messages is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    elif not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    if system and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    model = line.get("model") or defaults.model
    body: dict[str, Any] = {"model": defaults.model if defaults.model_override else model, "messages": messages}
    for name, value in options.items():
        body[_OPTION_FIELDS[name]] = value
    return body


def _line_options(line: Mapping[str, Any]) -> dict[str, Any]:
    nested = line.get("options") or {}
    if not isinstance(nested, dict):
        raise ValueError("options must be an object of option names to values")
    options = {**{k: v for k, v in line.items() if k not in _PROMPT_FIELDS}, **nested}
    unknown = sorted(name for name in options if name not in _OPTION_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)}; per-line options are {', '.join(sorted(_OPTION_FIELDS))}"
        )
    return {name: value for name, value in options.items() if value is not None and value != ""}


def _prompt_line(
    value: Any, defaults: PromptDefaults, source: str, number: int, index: int, seen: set[str]
) -> BatchLine:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise ValueError('each line must be a prompt: {"prompt": "..."} or {"messages": [...]}, or a JSON string')
    if "prompt" not in value and "messages" not in value:
        raise ValueError('a line needs a "prompt" or a "messages" field')
    custom_id = str(value.get("custom_id") or value.get("id") or f"{Path(source).name}:{number}")
    if custom_id in seen:
        raise ValueError(f"custom_id {custom_id!r} is used twice; each line needs its own")
    seen.add(custom_id)
    fields = {k: v for k, v in value.items() if k not in ("prompt", "messages", "custom_id", "id")}
    body = prompt_body(defaults, value.get("prompt"), value.get("messages"), **fields)
    prompt = value.get("prompt") if isinstance(value.get("prompt"), str) else _prompt_of("/v1/chat/completions", body)
    return BatchLine(index, custom_id, "/v1/chat/completions", body, source, number, prompt)


def _override_model(lines: list[BatchLine], defaults: PromptDefaults) -> list[BatchLine]:
    if not defaults.model_override:
        return lines
    return [
        BatchLine(li.index, li.custom_id, li.url, {**li.body, "model": defaults.model}, li.source, li.line, li.prompt)
        for li in lines
    ]


def _jsonl(text: str, source: str, defaults: PromptDefaults, start: int, seen: set[str]) -> list[BatchLine]:
    rows: list[tuple[int, Any]] = []
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((number, json.loads(raw)))
        except json.JSONDecodeError as error:
            problems.append((number, f"not valid JSON ({error.msg} at column {error.colno})"))
    if not problems and rows and isinstance(rows[0][1], dict) and {"custom_id", "body"} <= set(rows[0][1]):
        lines = parse_openai_jsonl(text, source=source, start=start)
        clash = next((line for line in lines if line.custom_id in seen), None)
        if clash is not None:
            raise BatchInputError(source, [(clash.line, f"custom_id {clash.custom_id!r} is used by another input")])
        seen.update(line.custom_id for line in lines)
        return _override_model(lines, defaults)
    lines = []
    for number, value in rows:
        try:
            lines.append(_prompt_line(value, defaults, source, number, start + len(lines), seen))
        except ValueError as error:
            problems.append((number, str(error)))
    if problems:
        raise BatchInputError(source, sorted(problems))
    return lines


def _csv(text: str, source: str, defaults: PromptDefaults, start: int, seen: set[str]) -> list[BatchLine]:
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if not columns & {"prompt", "messages"}:
        raise BatchInputError(source, [(1, 'the header needs a "prompt" or a "messages" column')])
    lines, problems = [], []
    for row in reader:
        number = reader.line_num
        value: dict[str, Any] = {k: _cell(v) for k, v in row.items() if k is not None and v not in (None, "")}
        if "messages" in value and isinstance(value["messages"], str):
            try:
                value["messages"] = json.loads(value["messages"])
            except json.JSONDecodeError:
                problems.append((number, "the messages column must hold a JSON list of {role, content} objects"))
                continue
        if "prompt" in value:
            value["prompt"] = row["prompt"]  # the text as written, never read as a number
        try:
            lines.append(_prompt_line(value, defaults, source, number, start + len(lines), seen))
        except ValueError as error:
            problems.append((number, str(error)))
    if problems:
        raise BatchInputError(source, problems)
    return lines


def _cell(text: str) -> Any:
    """A CSV cell as a number when it reads as one (temperature 0.2, num_predict 64), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _text(text: str, source: str, defaults: PromptDefaults, start: int, per_line: bool, seen: set[str]) -> list:
    if not per_line:
        try:
            return [_prompt_line({"prompt": text, "custom_id": source}, defaults, source, 1, start, seen)]
        except ValueError as error:
            raise BatchInputError(source, [(1, str(error))]) from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            lines.append(_prompt_line({"prompt": raw.strip()}, defaults, source, number, start + len(lines), seen))
    return lines


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named, found in a directory (sorted, hidden files skipped) or matched by a glob, in that order."""
    paths: list[Path] = []
    for given in inputs:
        if any(char in given for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).is_file())
            if not matches:
                raise InvalidRequestError(f"no file matches {given!r}")
            paths.extend(matches)
            continue
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise InvalidRequestError(f"the folder {path} has no files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InvalidRequestError(f"no input file or folder at {path}")
    return paths


def read_inputs(inputs: Iterable[str], defaults: PromptDefaults, *, per_line: bool = False) -> list[BatchLine]:
    """Every line of every input, in order: .jsonl/.ndjson (OpenAI batch or prompts), .csv, or text files."""
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for path in expand_inputs(inputs):
        source = str(path)
        try:
            text = decode_text(path.read_bytes(), source)
        except OSError as error:
            raise InvalidRequestError(f"cannot read {path}: {error.strerror}") from None
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            lines += _jsonl(text, source, defaults, len(lines), seen)
        elif suffix == ".csv":
            lines += _csv(text, source, defaults, len(lines), seen)
        else:
            lines += _text(text, source, defaults, len(lines), per_line, seen)
    if not lines:
        raise InvalidRequestError("the inputs hold no prompts")
    return lines
