"""The interactive chat of `ember run MODEL` on a terminal, as Ollama's (and llama.cpp's `-i`).

`>>> ` reads a message (or `\"\"\"` ... `\"\"\"` for several lines); the answer streams back. The conversation is
kept while it fits num_ctx: before each turn the oldest turns are dropped (the system prompt stays), with a
one-line notice. Ctrl-C during an answer cancels the generation and returns to the prompt; the partial answer
is kept in the history (so the conversation keeps alternating user/assistant), or, when nothing was written
yet, the question is dropped too. Ctrl-C at the prompt prints a hint; Ctrl-D or /bye quits.
`-r TEXT` (reverse prompts) act as stop strings: the answer ends where the model writes one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ember.cli.chat_backend import ChatBackend, open_backend
from ember.cli.output import print_metrics
from ember.errors import EmberError
from ember.options import LOAD_OPTION_NAMES, SAMPLING_OPTION_NAMES, LoadOptions, resolve_options
from ember.sessions import Session, SessionStore, check_session_name
from ember.types import Message

PROMPT = ">>> "
CONTINUATION = "... "
EXIT_HINT = "Use Ctrl + d or /bye to exit."

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, num_predict, num_ctx, stop ...)
  /set system TEXT            Set the system message
  /show info                  Show details for this model
  /show parameters            Show the parameters in use
  /show template              Show the chat template
  /show system                Show the system message
  /clear                      Clear the session context
  /save NAME                  Save the conversation as a session
  /load NAME                  Load a session (its model, system and parameters too)
  /context                    Show how much of the context window is used
  /bye                        Exit
  /?, /help                   Help for a command

Use \"\"\" to begin a multi-line message."""


class Repl:
    def __init__(
        self,
        model: str,
        load: dict[str, Any],
        sampling: dict[str, Any],
        *,
        system: str | None = None,
        format_: Any = None,
        reverse_prompts: Sequence[str] = (),
        verbose: bool = False,
        read: Callable[[str, str], str] | None = None,
    ) -> None:
        self.load = dict(load)
        self.sampling = dict(sampling)
        self.system = system
        self.format = format_
        self.reverse_prompts = list(reverse_prompts)
        self.verbose = verbose
        self.messages: list[Message] = []
        self.out = sys.stdout
        self.backend: ChatBackend = open_backend(model, self.load)
        self._read = read or _prompt_toolkit_reader()

    # --- the loop ------------------------------------------------------------------------------------

    def loop(self, first: str | None = None, prefill: str = "") -> int:
        if first:
            self.answer(first)
        while True:
            try:
                line = self._read(PROMPT, prefill)
                prefill = ""
            except KeyboardInterrupt:
                self.say(EXIT_HINT)
                continue
            except EOFError:
                return 0
            if line.lstrip().startswith('"""'):
                try:
                    line = self._read_multiline(line.lstrip()[3:])
                except KeyboardInterrupt:
                    self.say(EXIT_HINT)
                    continue
                except EOFError:
                    return 0
            elif line.startswith("/"):
                try:
                    if self.command(line.strip()) == "bye":
                        return 0
                except EmberError as error:
                    self.say(f"Error: {error}")
                continue
            if line.strip():
                try:
                    self.answer(line)
                except EmberError as error:
                    self.say(f"Error: {error}")

    def _read_multiline(self, rest: str) -> str:
        lines = []
        while True:
            if rest.endswith('"""'):
                lines.append(rest[:-3])
                return "\n".join(lines)
            lines.append(rest)
            rest = self._read(CONTINUATION, "")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # --- answering -----------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        options = dict(self.sampling)
        stops = [*options.get("stop", ()), *self.reverse_prompts]
        if stops:
            options["stop"] = stops
        return options

    def conversation(self, messages: Sequence[Message] | None = None) -> list[Message]:
        head = [Message(role="system", content=self.system)] if self.system else []
        return head + list(self.messages if messages is None else messages)

    def answer(self, text: str) -> None:
        question = Message(role="user", content=text)
        self._fit(question)
        self.messages.append(question)
        chunks = self.backend.chat(self.conversation(), self.options(), self.format)
        parts: list[str] = []
        final = None
        try:
            for chunk in chunks:
                if chunk.message.content:
                    parts.append(chunk.message.content)
                    self.out.write(chunk.message.content)
                    self.out.flush()
                if chunk.done:
                    final = chunk
        except KeyboardInterrupt:
            chunks.close()  # cancels the generation; what was written so far stays in the history
        except BaseException:
            chunks.close()
            self._keep(question, "".join(parts))
            self.out.write("\n")
            raise
        answer = "".join(parts)
        self._keep(question, answer)
        self.out.write("\n" if answer.endswith("\n") else "\n\n")
        self.out.flush()
        if self.verbose and final is not None:
            print_metrics(final, sys.stderr)

    def _keep(self, question: Message, answer: str) -> None:
        """Keep the turn with its (maybe partial) answer; with no answer at all, forget the question too."""
        if answer:
            self.messages.append(Message(role="assistant", content=answer))
        elif self.messages and self.messages[-1] is question:
            self.messages.pop()

    def _fit(self, question: Message) -> None:
        """Drop the oldest turns until the conversation and the new question leave room for an answer."""
        limit = _room(self.num_ctx, self.sampling.get("num_predict"))
        kept = list(self.messages)
        dropped = 0
        while kept and self.backend.count(self.conversation([*kept, question])) > limit:
            del kept[0]
            dropped += 1
            while kept and kept[0].role != "user":  # a conversation starts with the user
                del kept[0]
                dropped += 1
        if dropped:
            self.messages = kept
            self.say(f"(dropped {dropped} old message{'s' if dropped != 1 else ''} to fit num_ctx {self.num_ctx})")
        used = self.backend.count(self.conversation([question]))
        if used >= self.num_ctx:
            raise EmberError(f"the message takes {used} tokens, more than num_ctx {self.num_ctx}")

    @property
    def num_ctx(self) -> int:
        return int(self.load.get("num_ctx") or LoadOptions().num_ctx)

    # --- commands ------------------------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit"):
            return "bye"
        if name in ("/?", "/help"):
            self.say(HELP)
        elif name == "/set":
            self._set(rest)
        elif name == "/show":
            self._show(rest)
        elif name == "/clear":
            self.messages = []
            self.say("Cleared session context")
        elif name == "/context":
            used = self.backend.count(self.conversation()) if self.messages or self.system else 0
            self.say(
                f"{used} of {self.num_ctx} tokens used ({100 * used / self.num_ctx:.1f}%), "
                f"{len(self.messages)} messages"
            )
        elif name == "/save":
            self._save(rest)
        elif name == "/load":
            self._load(rest)
        else:
            self.say(f"Unknown command '{name}'. Type /? for help")
        return None

    def _set(self, rest: str) -> None:
        what, _, rest = rest.partition(" ")
        if what == "system":
            if not rest.strip():
                raise EmberError("usage: /set system TEXT")
            self.system = rest.strip().strip('"') if rest.strip().startswith('"') else rest.strip()
            self.say("Set system message.")
            return
        if what != "parameter":
            raise EmberError("usage: /set parameter NAME VALUE, or /set system TEXT")
        name, _, value_text = rest.strip().partition(" ")
        if not name or not value_text.strip():
            raise EmberError("usage: /set parameter NAME VALUE (for example: /set parameter temperature 0.5)")
        if name not in LOAD_OPTION_NAMES | SAMPLING_OPTION_NAMES:
            resolve_options({name: 1})  # the unknown-option message, with a suggestion
        value: Any = [word for word in value_text.split()] if name == "stop" else _parse_value(value_text.strip())
        if name in LOAD_OPTION_NAMES:
            load = {**self.load, name: value}
            resolve_options(load, self.sampling)
            if load != self.load:
                self.backend.reload(load)
                self.load = load
        else:
            sampling = {**self.sampling, name: value}
            resolve_options(self.load, sampling)
            self.sampling = sampling
        self.say(f"Set parameter '{name}' to '{value_text.strip()}'")

    def _show(self, what: str) -> None:
        if what == "info":
            facts = self.backend.facts()
            rows = [
                ("model", self.backend.model),
                ("architecture", facts.get("architecture")),
                ("parameters", facts.get("parameter_size")),
                ("quantization", facts.get("quantization")),
                ("context length", facts.get("context_length")),
                ("embedding length", facts.get("embedding_length")),
                ("num_ctx", self.num_ctx),
            ]
            self.say("  Model\n" + "\n".join(f"    {label:<20}{value}" for label, value in rows if value is not None))
        elif what == "parameters":
            defaults = dict(self.backend.facts().get("parameters_defaults") or {})
            shown = {**defaults, **self.load, **self.options()}
            if not shown:
                self.say("No parameters set; the defaults apply.")
            for key, value in shown.items():
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    self.say(f"{key:<20}{json.dumps(item) if isinstance(item, str) else item}")
        elif what == "template":
            self.say(self.backend.facts().get("template") or "No template.")
        elif what == "system":
            self.say(self.system or self.backend.facts().get("system") or "No system message was specified.")
        else:
            raise EmberError("usage: /show info | parameters | template | system")

    def _save(self, name: str) -> None:
        check_session_name(name)
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        SessionStore().save(
            Session(
                name=name, model=self.backend.model, system=self.system, options=self.saved_options(), messages=messages
            )
        )
        self.say(f"Saved session '{name}' ({len(messages)} messages).")

    def saved_options(self) -> dict[str, Any]:
        return {**self.load, **self.sampling}

    def _load(self, name: str) -> None:
        session = SessionStore().load(check_session_name(name))
        load = {k: v for k, v in session.options.items() if k in LOAD_OPTION_NAMES}
        sampling = {k: v for k, v in session.options.items() if k not in LOAD_OPTION_NAMES}
        resolve_options(load, sampling)
        if session.model != self.backend.model:
            backend = open_backend(session.model, load)
            self.backend.close()
            self.backend = backend
        elif load != self.load:
            self.backend.reload(load)
        self.load, self.sampling, self.system = load, sampling, session.system
        self.messages = [Message(role=m["role"], content=m["content"]) for m in session.messages]
        self.say(f"Loaded session '{name}': {session.model}, {len(self.messages)} messages.")

    def close(self) -> None:
        self.backend.close()


def _parse_value(text: str) -> Any:
    """`0.5` -> 0.5, `true` -> True, `{...}` -> a dict, anything else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _room(num_ctx: int, num_predict: Any) -> int:
    """How many tokens the prompt may take: room is kept for the answer (num_predict, or a quarter)."""
    reserve = num_predict if isinstance(num_predict, int) and num_predict > 0 else num_ctx // 4
    return max(1, num_ctx - max(1, min(reserve, num_ctx // 2)))


def _prompt_toolkit_reader() -> Callable[[str, str], str]:
    from prompt_toolkit import PromptSession

    session: PromptSession[str] = PromptSession()

    def read(prompt: str, default: str = "") -> str:
        return session.prompt(prompt, default=default)

    return read


def run_repl(
    model: str,
    load: dict[str, Any],
    sampling: dict[str, Any],
    *,
    system: str | None,
    format_: Any,
    reverse_prompts: Sequence[str],
    verbose: bool,
    first: str | None,
    prefill: str = "",
) -> int:
    """Open the chat; `first` is answered before the first prompt, `prefill` is put in the first input line."""
    repl = Repl(model, load, sampling, system=system, format_=format_, reverse_prompts=reverse_prompts, verbose=verbose)
    try:
        return repl.loop(first, prefill)
    finally:
        repl.close()
