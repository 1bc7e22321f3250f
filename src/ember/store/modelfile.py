"""Ollama's Modelfile: reading one into a `Modelfile`, and writing one back as `ollama show --modelfile` does.

The syntax is Ollama's (docs/modelfile.md in the Ollama repository)::

    # a comment
    FROM llama3.2                      # required, exactly once: a model name or a path
    PARAMETER temperature 0.7          # any ember option; `stop` may repeat and accumulates
    PARAMETER stop "<|im_end|>"
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"     # a Jinja or an Ollama Go template
    SYSTEM You are a helpful assistant.
    MESSAGE user Is Toronto in Canada?
    MESSAGE assistant yes
    LICENSE \"\"\"...\"\"\"                # may repeat
    ADAPTER ./lora.gguf                # may repeat

An upstream model (served by OpenAI-compatible servers, see ember.store.upstream) has one FROM line per
replica, `FROM upstream+http://HOST:PORT/v1 MODEL`, and may name the variable holding its key with
`PARAMETER upstream_key_env NAME`.

Instruction names are case-insensitive and may come in any order. A value is the rest of the line (surrounding
spaces dropped), a "double-quoted" string (which may span lines; \\" is a quote and \\\\ a backslash, any other
backslash is kept as written), or a \"\"\"triple-quoted\"\"\" string taken verbatim up to the next \"\"\".
"""

from __future__ import annotations

import difflib
import logging
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

from ember.errors import InvalidOptionError, InvalidRequestError
from ember.options import ALL_OPTION_NAMES, IGNORED_OLLAMA_OPTIONS, LoadOptions, SamplingOptions, resolve_options
from ember.store.upstream import KEY_ENV_PARAMETER, UpstreamSpec, build_spec, check_key_env, is_upstream

log = logging.getLogger(__name__)

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "ADAPTER")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# Newer Ollama instructions ember has no use for: named in the error so that the user knows why.
_OLLAMA_ONLY_INSTRUCTIONS = ("REQUIRES", "RENDERER", "PARSER")

_HORIZONTAL_SPACE = " \t"
_BARE_STRIP = " \t\r"
_TRUE = frozenset({"1", "t", "true"})  # Go's strconv.ParseBool, as Ollama reads them
_FALSE = frozenset({"0", "f", "false"})
_INTEGER = re.compile(r"[+-]?[0-9]+")


class ModelfileError(InvalidRequestError):
    """A Modelfile could not be read. The message always starts with `Modelfile line N: `."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Modelfile line {line}: {message}")
        self.line = line


@dataclass
class Modelfile:
    """What a Modelfile says. `from_` and `adapters` are as written (a model name or a path)."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    upstream: UpstreamSpec | None = None  # FROM upstream+URL MODEL (one line per replica)


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def line_at(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_blank_lines_and_comments(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r\n":
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def skip_horizontal_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _HORIZONTAL_SPACE:
            self.pos += 1

    def word(self) -> str:
        self.skip_horizontal_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in " \t\r\n":
            self.pos += 1
        return self.text[start : self.pos]

    def value(self, line: int, label: str) -> str:
        self.skip_horizontal_space()
        text = self.text
        if self.at_end() or text[self.pos] in "\r\n":
            raise ModelfileError(line, f"{label} needs a value")
        if text.startswith('"""', self.pos):
            close = text.find('"""', self.pos + 3)
            if close < 0:
                raise ModelfileError(
                    self.line_at(self.pos),
                    f'the """ of {label} that begins on this line is never closed',
                )
            value = text[self.pos + 3 : close]
            self.pos = close + 3
            self._end_of_line(label)
            return value
        if text[self.pos] == '"':
            return self._double_quoted(label)
        end = text.find("\n", self.pos)
        end = len(text) if end < 0 else end
        value = text[self.pos : end].strip(_BARE_STRIP)
        self.pos = end
        return value

    def _double_quoted(self, label: str) -> str:
        text, start = self.text, self.pos
        chars: list[str] = []
        index = start + 1
        while index < len(text):
            char = text[index]
            if char == "\\" and index + 1 < len(text) and text[index + 1] in '"\\':
                chars.append(text[index + 1])
                index += 2
            elif char == '"':
                self.pos = index + 1
                self._end_of_line(label)
                return "".join(chars)
            else:
                chars.append(char)
                index += 1
        raise ModelfileError(self.line_at(start), f'the quote (") of {label} that begins on this line is never closed')

    def _end_of_line(self, label: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _BARE_STRIP:
            self.pos += 1
        if self.pos < len(self.text) and self.text[self.pos] != "\n":
            end = self.text.find("\n", self.pos)
            extra = self.text[self.pos : len(self.text) if end < 0 else end]
            raise ModelfileError(
                self.line_at(self.pos), f"unexpected text {extra!r} after the closing quote of {label}"
            )


def _option_type(name: str) -> type:
    """The Python type of an option's values (`list` for `stop`), read from its pydantic field."""
    fields = SamplingOptions.model_fields if name in SamplingOptions.model_fields else LoadOptions.model_fields
    annotation = fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is tuple:
        return list
    assert isinstance(annotation, type)
    return annotation


def _convert(name: str, kind: type, raw: str, line: int) -> Any:
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ModelfileError(line, f"PARAMETER {name} must be true or false, not {raw!r}")
    if kind is int:
        if not _INTEGER.fullmatch(raw):
            raise ModelfileError(line, f"PARAMETER {name} must be a whole number, not {raw!r}")
        return int(raw)
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ModelfileError(line, f"PARAMETER {name} must be a number, not {raw!r}") from None
    return raw


def _add_parameter(parameters: dict[str, Any], name: str, raw: str, line: int) -> None:
    if name == "fallback":  # ember's: a model that answers when this one cannot (repeatable, tried in order)
        if not raw.strip():
            raise ModelfileError(line, "PARAMETER fallback needs a model name, as in PARAMETER fallback smollm2")
        parameters.setdefault("fallback", []).append(raw.strip())
        return
    if name in IGNORED_OLLAMA_OPTIONS:
        log.warning("Modelfile line %d: PARAMETER %s has no effect in ember (Ollama ignores it too)", line, name)
        return
    if name not in ALL_OPTION_NAMES:
        close = difflib.get_close_matches(name, sorted(ALL_OPTION_NAMES), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; valid parameters: {', '.join(sorted(ALL_OPTION_NAMES))}"
        raise ModelfileError(line, f"unknown PARAMETER {name!r}{hint}")
    kind = _option_type(name)
    value = _convert(name, kind, raw, line)
    try:
        resolve_options({name: [value] if kind is list else value})
    except InvalidOptionError as error:
        raise ModelfileError(line, str(error)) from None
    if kind is list:
        parameters.setdefault(name, []).append(value)
    else:
        parameters[name] = value


def parse_modelfile(text: str) -> Modelfile:
    """Read a Modelfile. Every mistake raises `ModelfileError` naming the line.

    >>> parse_modelfile('FROM smollm2\\nPARAMETER temperature 0.2\\nSYSTEM "Be brief."').parameters
    {'temperature': 0.2}
    """
    reader = _Reader(text.removeprefix("\ufeff"))
    from_: str | None = None
    from_line = 0
    result = Modelfile(from_="")
    upstream_from: list[str] = []
    key_env: tuple[str, int] | None = None
    while True:
        reader.skip_blank_lines_and_comments()
        if reader.at_end():
            break
        line = reader.line_at(reader.pos)
        word = reader.word()
        instruction = word.upper()
        if instruction == "PARAMETER":
            name = reader.word()
            if not name:
                raise ModelfileError(line, "PARAMETER needs a name and a value, as in PARAMETER temperature 0.7")
            if name == KEY_ENV_PARAMETER:
                try:
                    key_env = (check_key_env(reader.value(line, f"PARAMETER {name}")), line)
                except InvalidRequestError as error:
                    raise ModelfileError(line, str(error)) from None
                continue
            _add_parameter(result.parameters, name, reader.value(line, f"PARAMETER {name}"), line)
        elif instruction == "MESSAGE":
            role = reader.word()
            if role.lower() not in MESSAGE_ROLES:
                shown = f"not {role!r}" if role else "and is missing"
                raise ModelfileError(line, f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, {shown}")
            content = reader.value(line, f"MESSAGE {role}")
            result.messages.append({"role": role.lower(), "content": content})
        elif instruction in INSTRUCTIONS:
            value = reader.value(line, instruction)
            if instruction == "FROM" and is_upstream(value):
                if from_ is not None and not upstream_from:
                    raise ModelfileError(line, f"an upstream FROM cannot follow the FROM of line {from_line}")
                upstream_from.append(value)
                if from_ is None:
                    from_, from_line = value, line
            elif instruction == "FROM":
                if from_ is not None and upstream_from:
                    raise ModelfileError(line, "after upstream FROM lines, each FROM must be another upstream replica")
                if from_ is not None:
                    raise ModelfileError(line, f"a second FROM (the first is on line {from_line}); give exactly one")
                if not value:
                    raise ModelfileError(line, "FROM needs a model name or a path")
                from_, from_line = value, line
            elif instruction == "TEMPLATE":
                result.template = value
            elif instruction == "SYSTEM":
                result.system = value
            elif instruction == "LICENSE":
                result.license.append(value)
            else:
                result.adapters.append(value)
        elif instruction in _OLLAMA_ONLY_INSTRUCTIONS:
            raise ModelfileError(line, f"ember does not support Ollama's {instruction} instruction")
        else:
            close = difflib.get_close_matches(instruction, INSTRUCTIONS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ModelfileError(
                line, f"unknown instruction {word!r}; {hint}instructions are {', '.join(INSTRUCTIONS)}"
            )
    if from_ is None:
        raise ModelfileError(1, "no FROM instruction; a Modelfile must name its base model, as in FROM llama3.2")
    result.from_ = from_
    if upstream_from:
        try:
            result.upstream = build_spec(upstream_from, key_env[0] if key_env else None)
        except InvalidRequestError as error:
            raise ModelfileError(from_line, str(error)) from None
        if result.template is not None or result.adapters:
            raise ModelfileError(
                from_line, "an upstream model takes no TEMPLATE or ADAPTER: the upstream server applies its own"
            )
    elif key_env is not None:
        raise ModelfileError(key_env[1], f"PARAMETER {KEY_ENV_PARAMETER} is for upstream models (FROM upstream+URL)")
    return result


def _quote(value: str) -> str:
    """`value` written so that `parse_modelfile` reads back exactly the same string."""
    if (
        value
        and value[0] not in _BARE_STRIP + '"'
        and value[-1] not in _BARE_STRIP
        and "\n" not in value
        and "\r" not in value
    ):
        return value
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_modelfile(
    *,
    from_: str,
    parameters: Mapping[str, Any],
    template: str | None,
    system: str | None,
    messages: Sequence[Mapping[str, str]],
    license: Sequence[str],
    adapters: Sequence[str],
    upstream: UpstreamSpec | None = None,
) -> str:
    """The Modelfile text that recreates a model, in the order `ollama show --modelfile` prints it.

    `parse_modelfile` reads the result back to an equal `Modelfile`. Parameters set to None are left out;
    a list or tuple value (`stop`) gives one PARAMETER line per item.
    """
    lines = [f"FROM {_quote(line)}" for line in upstream.from_lines()] if upstream else [f"FROM {_quote(from_)}"]
    if upstream is not None and upstream.key_env:
        lines.append(f"PARAMETER {KEY_ENV_PARAMETER} {upstream.key_env}")
    lines += [f"ADAPTER {_quote(adapter)}" for adapter in adapters]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    for name, value in parameters.items():
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            lines.append(f"PARAMETER {name} {_quote(_format_value(item))}")
    lines += [f"LICENSE {_quote(text)}" for text in license]
    lines += [f"MESSAGE {message['role']} {_quote(message['content'])}" for message in messages]
    return "\n".join(lines) + "\n"
