"""The interactive chat of `ember run MODEL` on a terminal, as Ollama's (and llama.cpp's `-i`).

`>>> ` reads a message (or `\"\"\"` ... `\"\"\"` for several lines); the answer streams back. The chat is a stored
conversation (EMBER_HOME/ember.db, the server's store): it is saved as it goes, `/sessions` lists and searches
the stored conversations (the API's too) and `/load NAME|ID` resumes one, in this process or another. The
server keeps it within num_ctx (the conversation's strategy, sliding by default: the oldest turns are dropped
in one step when it is full, with a one-line notice); `/context` shows the meter, and a warning is printed once
the context passes its threshold. Ctrl-C during an answer cancels the generation and returns to the prompt;
the partial answer stays in the conversation, marked incomplete. Ctrl-C at the prompt prints a hint; Ctrl-D or
/bye quits. `-r TEXT` (reverse prompts) act as stop strings: the answer ends where the model writes one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ember.cli.conversation_client import ConversationClient, open_client
from ember.cli.output import print_metrics
from ember.errors import EmberError
from ember.options import LOAD_OPTION_NAMES, SAMPLING_OPTION_NAMES, LoadOptions, resolve_options
from ember.types import ChatResponse

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
  /clear                      Start a new conversation (this one stays saved)
  /save NAME                  Name the conversation (it is saved as it goes)
  /sessions [WORDS]           List the saved conversations, or those with these words
  /load NAME|ID               Resume a saved conversation (its model, system and parameters too)
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
        self.out = sys.stdout
        self.client: ConversationClient
        self.client, self.model = open_client(model, self.load)
        self.conversation_id: str | None = None
        self.title = ""
        self.message_count = 0
        self.dropped = 0  # messages the strategy had left out of the last prompt
        self.warned = False
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
        """This turn's options: the load options, the sampling ones, and the reverse prompts as stops."""
        options = {**self.load, **self.sampling}
        stops = [*options.get("stop", ()), *self.reverse_prompts]
        if stops:
            options["stop"] = stops
        return options

    def saved_options(self) -> dict[str, Any]:
        return {**self.load, **self.sampling}

    def conversation(self, title: str = "") -> str:
        """The stored conversation of this chat, made at its first message."""
        if self.conversation_id is None:
            data = self.client.create(
                model=self.model,
                title=" ".join(title.split())[:60],
                system=self.system,
                options=self.saved_options(),
                strategy="sliding",
                origin="repl",
            )
            self._adopt(data)
        assert self.conversation_id is not None
        return self.conversation_id

    def _adopt(self, data: dict[str, Any]) -> None:
        conversation = data["conversation"]
        self.conversation_id = conversation["id"]
        self.title = conversation["title"]
        self.message_count = len(data.get("messages", ()))
        self.dropped, self.warned = 0, False

    def answer(self, text: str) -> None:
        conversation_id = self.conversation(title=text)
        chunks = self.client.chat(conversation_id, text, self.options(), self.format)
        self.message_count += 1  # the question is stored before the answer begins
        parts: list[str] = []
        final = None
        try:
            for line in chunks:
                content = (line.get("message") or {}).get("content", "")
                if content:
                    parts.append(content)
                    self.out.write(content)
                    self.out.flush()
                if line.get("done"):
                    final = line
        except KeyboardInterrupt:
            chunks.close()  # cancels the generation; what was written so far stays in the conversation
        except BaseException:
            chunks.close()
            self.message_count += bool(parts)
            self.out.write("\n")
            raise
        answer = "".join(parts)
        self.message_count += bool(answer)
        self.out.write("\n" if answer.endswith("\n") else "\n\n")
        self.out.flush()
        if final is not None:
            self._meter(final.get("context") or {})
            if self.verbose:
                print_metrics(ChatResponse(**final), sys.stderr)

    def _meter(self, context: dict[str, Any]) -> None:
        """Say when the strategy dropped or summarized messages, and when the context passes its threshold."""
        dropped = int(context.get("dropped", 0)) + int(context.get("summarized", 0))
        if dropped > self.dropped:
            count = dropped - self.dropped
            what = "summarized" if context.get("strategy") == "summarize" else "dropped"
            self.say(f"({what} {count} old message{'s' if count != 1 else ''} to fit num_ctx {context.get('limit')})")
        self.dropped = dropped
        if context.get("warning") and not self.warned:
            self.say(f"({context['warning']})")
        self.warned = bool(context.get("warning"))

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
            self.conversation_id, self.message_count, self.title = None, 0, ""
            self.say("Cleared session context")
        elif name == "/context":
            self._context()
        elif name == "/save":
            self._save(rest)
        elif name in ("/sessions", "/list"):
            self._sessions(rest)
        elif name == "/load":
            self._load(rest)
        else:
            self.say(f"Unknown command '{name}'. Type /? for help")
        return None

    def _context(self) -> None:
        if self.conversation_id is None and not self.system:
            self.say(f"0 of {self.num_ctx} tokens used (0.0%), 0 messages")
            return
        context = self.client.context(self.conversation())
        if context.get("error"):
            self.say(f"Error: {context['error']}")
            return
        used, limit = int(context.get("used") or 0), int(context.get("limit") or self.num_ctx)
        details = [f"{self.message_count} messages", f"strategy {context.get('strategy')}"]
        details += [f"{context[key]} {key}" for key in ("dropped", "summarized") if context.get(key)]
        self.say(f"{used} of {limit} tokens used ({100 * used / limit:.1f}%), " + ", ".join(details))

    def _set(self, rest: str) -> None:
        what, _, rest = rest.partition(" ")
        if what == "system":
            if not rest.strip():
                raise EmberError("usage: /set system TEXT")
            self.system = rest.strip().strip('"') if rest.strip().startswith('"') else rest.strip()
            if self.conversation_id is not None:
                self.client.update(self.conversation_id, system=self.system)
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
                self.client.load(self.model, load)
                self.load = load
        else:
            sampling = {**self.sampling, name: value}
            resolve_options(self.load, sampling)
            self.sampling = sampling
        if self.conversation_id is not None:
            self.client.update(self.conversation_id, options=self.saved_options())
        self.say(f"Set parameter '{name}' to '{value_text.strip()}'")

    def _show(self, what: str) -> None:
        if what == "info":
            facts = self.client.facts(self.model)
            rows = [
                ("model", self.model),
                ("architecture", facts.get("architecture")),
                ("parameters", facts.get("parameter_size")),
                ("quantization", facts.get("quantization")),
                ("context length", facts.get("context_length")),
                ("embedding length", facts.get("embedding_length")),
                ("num_ctx", self.num_ctx),
            ]
            self.say("  Model\n" + "\n".join(f"    {label:<20}{value}" for label, value in rows if value is not None))
        elif what == "parameters":
            defaults = dict(self.client.facts(self.model).get("parameters_defaults") or {})
            shown = {**defaults, **self.options()}
            if not shown:
                self.say("No parameters set; the defaults apply.")
            for key, value in shown.items():
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    self.say(f"{key:<20}{json.dumps(item) if isinstance(item, str) else item}")
        elif what == "template":
            self.say(self.client.facts(self.model).get("template") or "No template.")
        elif what == "system":
            self.say(self.system or self.client.facts(self.model).get("system") or "No system message was specified.")
        else:
            raise EmberError("usage: /show info | parameters | template | system")

    def _save(self, name: str) -> None:
        title = " ".join(name.split())
        if not title:
            raise EmberError("usage: /save NAME")
        if self.conversation_id is None:
            self.conversation(title=title)
        else:
            self._adopt(self.client.update(self.conversation_id, title=title))
        self.title = title
        self.say(f"Saved conversation '{title}' ({self.message_count} messages).")

    def _sessions(self, query: str) -> None:
        rows = self.client.list(query or None, limit=20)
        if not rows:
            self.say(f"No conversations with {query!r}." if query else "No saved conversations.")
            return
        now = time.time()
        for row in rows:
            mark = "*" if row["id"] == self.conversation_id else " "
            title = (row["title"] or "(untitled)")[:40]
            line = f"{mark} {row['id']}  {title:<40}  {row['model'][:20]:<20}  {row['message_count']:>4} messages  "
            line += _age(now - row["updated_at"])
            if row.get("snippet"):
                line += f"\n      {row['snippet']}"
            self.say(line)

    def _load(self, name: str) -> None:
        if not name:
            raise EmberError("usage: /load NAME|ID (see /sessions)")
        data = self.client.get(name)
        conversation = data["conversation"]
        options = dict(conversation.get("options") or {})
        load = {k: v for k, v in options.items() if k in LOAD_OPTION_NAMES}
        sampling = {k: v for k, v in options.items() if k not in LOAD_OPTION_NAMES}
        resolve_options(load, sampling)
        model = conversation.get("model") or self.model
        if (model, load) != (self.model, self.load):
            self.client.load(model, load)
        self.load, self.sampling, self.system, self.model = load, sampling, conversation.get("system"), model
        self._adopt(data)
        label = f"'{self.title}' ({self.conversation_id})" if self.title else str(self.conversation_id)
        self.say(f"Loaded conversation {label}: {self.model}, {self.message_count} messages.")

    def close(self) -> None:
        self.client.close()


def _age(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "just now"


def _parse_value(text: str) -> Any:
    """`0.5` -> 0.5, `true` -> True, `{...}` -> a dict, anything else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


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
