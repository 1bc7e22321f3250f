"""Ollama's Go chat templates, translated to the Jinja templates ember renders.

Ollama's older ("legacy") templates use only `.System`, `.Prompt` and `.Response`. Ollama renders such a
template once per turn of the conversation (template/template.go, `Template.Execute`):

- consecutive messages of the same role are first merged into one, joined by a blank line;
- going through the messages, a system message sets .System, a user message .Prompt and an assistant message
  .Response; a user message that follows a response, or a system message that follows a prompt or a response,
  first renders the turn collected so far and starts a new one with all three empty. Other roles are skipped.
  So .System is only set in the turn that follows the system message (normally the first);
- the last turn is rendered with the template cut just after its first `{{ .Response }}`: everything after it
  is dropped, so the model goes on writing the answer there (the conditions of enclosing `if`s are kept);
- a template that never mentions .Response gets `{{ .Response }}` appended to it first.

`translate_go_template` writes a Jinja template over `messages` that does exactly this. Go templates that do more
(`range .Messages`, `.Tools`, functions, variables, comparisons) are refused: write those TEMPLATEs in Jinja.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.errors import TemplateError

_SPACE = " \t\r\n"  # what Go's trim markers remove
_FIELDS = {"System": "system", "Prompt": "prompt", "Response": "response"}
_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:[.$]|/\*|(?:if|range|with|define|template|block)\s+\S|else\s+(?:if|with)\s"
    r"|(?:else|end|break|continue)\s*(?:-\s*)?\}\})"
)
_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
    |(?P<dot>\.)
    |(?P<var>\$[A-Za-z0-9_]*)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|`[^`]*`)
    |(?P<char>'(?:[^'\\\n]|\\.)*')
    |(?P<number>[+-]?\.?[0-9][\w.+-]*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<punct>:=|=|\||\(|\)|,)""",
    re.VERBOSE,
)
_GO_ESCAPE = re.compile(r"\\(?:([abfnrtv\\\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|([0-7]{3}))")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_KEYWORD_REASONS = {
    "range": "a range loop",
    "with": "a with block",
    "define": "a named template",
    "template": "a named template",
    "block": "a named template",
    "break": "loop control",
    "continue": "loop control",
    "if": "an if inside an expression",
}
_COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})


def is_go_template(text: str) -> bool:
    """Whether `text` is an Ollama Go template (`{{ .Prompt }}`, `{{ if .System }}`, `{{ end }}` ...), not Jinja."""
    return _GO_ACTION.search(text) is not None


@dataclass
class _Text:
    text: str


@dataclass
class _Field:
    name: str


@dataclass
class _If:
    branches: list[tuple[str, list[_Node]]]  # (Jinja condition, body) for `if` and each `else if`
    else_body: list[_Node] | None = None


_Node = _Text | _Field | _If


@dataclass
class _Action:
    body: str
    source: str
    line: int


def _refuse(action: _Action, reason: str) -> TemplateError:
    return TemplateError(
        f"cannot translate the Ollama (Go) template to Jinja: {action.source!r} (line {action.line}) uses "
        f"{reason}; only .System, .Prompt, .Response and if/else/end can be translated, "
        "so write the TEMPLATE in Jinja instead"
    )


def _find_action_end(text: str, start: int, line: int) -> tuple[int, int, bool]:
    """(end of the action, end of its body, whether it has a right trim marker) for an action body at `start`."""
    if text.startswith("/*", start):
        close = text.find("*/", start + 2)
        if close < 0:
            raise TemplateError(f"the Go template has an unclosed comment on line {line}")
        index = close + 2
        if text.startswith("}}", index):
            return index + 2, index, False
        if text[index : index + 1] in tuple(_SPACE) and text.startswith("-}}", index + 1):
            return index + 4, index, True
        raise TemplateError(f"the Go template's comment on line {line} ends before its closing }}}}")
    index = start
    while index < len(text):
        char = text[index]
        if char in "\"'`":
            index += 1
            while index < len(text) and text[index] != char:
                index += 2 if text[index] == "\\" and char != "`" else 1
        elif char in _SPACE and text.startswith("-}}", index + 1):
            return index + 4, index, True
        elif text.startswith("}}", index):
            return index + 2, index, False
        index += 1
    raise TemplateError(f"the Go template has an unclosed action ({{{{ without }}}}) on line {line}")


def _lex(text: str) -> list[str | _Action]:
    """Literal text and actions in order, with Go's trim markers already applied to the text."""
    pieces: list[str | _Action] = []
    pos, trim_next = 0, False
    while True:
        start = text.find("{{", pos)
        chunk = text[pos:] if start < 0 else text[pos:start]
        if trim_next:
            chunk = chunk.lstrip(_SPACE)
        if start < 0:
            pieces.append(chunk)
            return pieces
        inner = start + 2
        if text[inner : inner + 1] == "-" and text[inner + 1 : inner + 2] in tuple(_SPACE):
            chunk = chunk.rstrip(_SPACE)
            inner += 2
        pieces.append(chunk)
        line = text.count("\n", 0, start) + 1
        end, body_end, trim_next = _find_action_end(text, inner, line)
        pieces.append(_Action(text[inner:body_end].strip(_SPACE), text[start:end], line))
        pos = end


def _tokenize(action: _Action) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(action.body):
        match = _TOKEN.match(action.body, pos)
        if match is None:
            raise _refuse(action, f"the character {action.body[pos]!r}")
        if match.lastgroup != "space":
            tokens.append((str(match.lastgroup), match.group()))
        pos = match.end()
    return tokens


def _go_string(literal: str) -> str:
    if literal.startswith("`"):
        return literal[1:-1]

    def unescape(match: re.Match[str]) -> str:
        simple, *codes = match.groups()
        if simple:
            return _SIMPLE_ESCAPES[simple]
        hex_code = next((code for code in codes[:3] if code), None)
        return chr(int(hex_code, 16)) if hex_code else chr(int(str(codes[3]), 8))

    return _GO_ESCAPE.sub(unescape, literal[1:-1])


def _unsupported(action: _Action, tokens: list[tuple[str, str]], in_condition: bool) -> TemplateError:
    for kind, value in tokens:
        if kind == "var":
            return _refuse(action, f"the variable {value} (Go template variables)")
        if kind == "field" and value[1:] not in _FIELDS:
            return _refuse(action, f"the field {value}")
        if kind == "dot":
            return _refuse(action, "the dot (.) on its own")
        if kind == "ident" and value in _KEYWORD_REASONS:
            return _refuse(action, f"{_KEYWORD_REASONS[value]} ({value})")
        if kind == "ident" and value in _COMPARISONS:
            return _refuse(action, f"the comparison {value}")
        if kind == "ident" and not (in_condition and value in ("not", "and", "or")):
            return _refuse(action, f"the function {value}")
        if kind == "punct":
            return _refuse(action, f"{value!r} (pipelines, parentheses and assignments)")
        if kind in ("number", "char") or (kind == "string" and in_condition):
            return _refuse(action, f"the constant {value}")
    return _refuse(action, "an expression ember cannot translate")


def _condition(action: _Action, tokens: list[tuple[str, str]]) -> str:
    """The Jinja condition for `if`'s arguments: a field, or not/and/or over fields."""
    if not tokens:
        raise TemplateError(f"the Go template's {action.source!r} on line {action.line} has no condition")
    names = [_FIELDS[value[1:]] for kind, value in tokens if kind == "field" and value[1:] in _FIELDS]
    if len(tokens) == 1 and len(names) == 1:
        return names[0]
    operator = tokens[0][1] if tokens[0][0] == "ident" else ""
    if len(names) == len(tokens) - 1:
        if operator == "not" and len(names) == 1:
            return f"(not {names[0]})"
        if operator in ("and", "or") and len(names) >= 2:
            return "(" + f" {operator} ".join(names) + ")"
    raise _unsupported(action, tokens, in_condition=True)


def _parse(text: str) -> tuple[list[_Node], bool]:
    """The template's nodes, and whether it mentions .Response anywhere."""
    root: list[_Node] = []
    current = root
    open_ifs: list[tuple[_If, list[_Node], _Action]] = []  # the `if`, the list it sits in, where it began
    mentions_response = False
    for piece in _lex(text):
        if isinstance(piece, str):
            if piece:
                current.append(_Text(piece))
            continue
        if piece.body.startswith("/*"):
            continue  # a comment
        tokens = _tokenize(piece)
        mentions_response = mentions_response or ("field", ".Response") in tokens
        if not tokens:
            raise TemplateError(f"the Go template has an empty action {piece.source!r} on line {piece.line}")
        kind, value = tokens[0]
        if kind == "field" and len(tokens) == 1 and value[1:] in _FIELDS:
            current.append(_Field(value[1:]))
        elif kind == "string" and len(tokens) == 1:
            current.append(_Text(_go_string(value)))
        elif (kind, value) == ("ident", "if"):
            node = _If([(_condition(piece, tokens[1:]), [])])
            current.append(node)
            open_ifs.append((node, current, piece))
            current = node.branches[-1][1]
        elif (kind, value) == ("ident", "else") and open_ifs and open_ifs[-1][0].else_body is None:
            node = open_ifs[-1][0]
            if len(tokens) == 1:
                node.else_body = current = []
            elif tokens[1] == ("ident", "if"):
                node.branches.append((_condition(piece, tokens[2:]), []))
                current = node.branches[-1][1]
            else:
                raise _unsupported(piece, tokens[1:], in_condition=False)
        elif (kind, value) == ("ident", "end") and open_ifs and len(tokens) == 1:
            _, current, _ = open_ifs.pop()
        elif (kind, value) in (("ident", "else"), ("ident", "end")):
            raise TemplateError(f"the Go template's {piece.source!r} on line {piece.line} has no matching {{{{ if }}}}")
        else:
            raise _unsupported(piece, tokens, in_condition=False)
    if open_ifs:
        where = open_ifs[-1][2]
        raise TemplateError(f"the Go template's {where.source!r} on line {where.line} has no matching {{{{ end }}}}")
    return root, mentions_response


def _cut(nodes: list[_Node], done: list[bool]) -> list[_Node]:
    """The nodes up to and including the first {{ .Response }} (Ollama's last turn); `done` says it was found."""
    kept: list[_Node] = []
    for node in nodes:
        if done[0]:
            break
        if isinstance(node, _If):
            branches = [(condition, _cut(body, done)) for condition, body in node.branches]
            else_body = None if node.else_body is None else _cut(node.else_body, done)
            kept.append(_If(branches, else_body))
        else:
            kept.append(node)
            done[0] = isinstance(node, _Field) and node.name == "Response"
    return kept


def _jinja_string(text: str) -> str:
    """A Jinja string literal for `text`: no template syntax inside it is ever interpreted."""
    out = []
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def _emit(nodes: list[_Node], depth: int) -> list[str]:
    pad = "    " * depth
    lines: list[str] = []
    for node in nodes:
        if isinstance(node, _Text):
            lines.append(f"{pad}{{{{- {_jinja_string(node.text)} -}}}}")
        elif isinstance(node, _Field):
            lines.append(f"{pad}{{{{- {_FIELDS[node.name]} -}}}}")
        else:
            for index, (condition, body) in enumerate(node.branches):
                lines.append(f"{pad}{{%- {'if' if index == 0 else 'elif'} {condition} -%}}")
                lines += _emit(body, depth + 1)
            if node.else_body is not None:
                lines.append(f"{pad}{{%- else -%}}")
                lines += _emit(node.else_body, depth + 1)
            lines.append(f"{pad}{{%- endif -%}}")
    return lines


# Walks the conversation as Ollama's Template.Execute does; ollama_turn and ollama_last_turn render one turn.
_DRIVER = """\
{%- set ns = namespace(content='', system='', prompt='', response='') -%}
{%- for message in messages -%}
    {%- set content = message['content'] or '' -%}
    {%- if loop.first or message['role'] != loop.previtem['role'] -%}
        {%- set ns.content = content -%}
    {%- else -%}
        {%- set ns.content = ns.content ~ '\\n\\n' ~ content -%}
    {%- endif -%}
    {%- if loop.last or loop.nextitem['role'] != message['role'] -%}
        {%- if message['role'] == 'system' -%}
            {%- if ns.prompt or ns.response -%}
                {{- ollama_turn(ns.system, ns.prompt, ns.response) -}}
                {%- set ns.prompt = '' -%}
                {%- set ns.response = '' -%}
            {%- endif -%}
            {%- set ns.system = ns.content -%}
        {%- elif message['role'] == 'user' -%}
            {%- if ns.response -%}
                {{- ollama_turn(ns.system, ns.prompt, ns.response) -}}
                {%- set ns.system = '' -%}
                {%- set ns.response = '' -%}
            {%- endif -%}
            {%- set ns.prompt = ns.content -%}
        {%- elif message['role'] == 'assistant' -%}
            {%- set ns.response = ns.content -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{{- ollama_last_turn(ns.system, ns.prompt, ns.response) -}}
"""


def translate_go_template(text: str) -> str:
    """An equivalent Jinja chat template (over `messages`) for a legacy Ollama Go template.

    Raises `TemplateError` naming the construct when the template uses more than .System, .Prompt, .Response,
    string constants and if/else if/else/end (with not/and/or over those fields); write such a TEMPLATE in Jinja.
    """
    nodes, mentions_response = _parse(text)
    if not mentions_response:
        nodes.append(_Field("Response"))  # as Ollama's template.Parse does
    last_turn = _cut(nodes, [False])
    return "\n".join(
        [
            "{#- Translated by ember from an Ollama Go template: rendered once per turn, as Ollama does. -#}",
            "{%- macro ollama_turn(system, prompt, response) -%}",
            *_emit(nodes, 1),
            "{%- endmacro -%}",
            "{%- macro ollama_last_turn(system, prompt, response) -%}",
            *_emit(last_turn, 1),
            "{%- endmacro -%}",
            _DRIVER,
        ]
    )
