"""The chat of `ember run MODEL` on a terminal, driven through a pseudo-terminal as a user types.

TERM=dumb makes prompt_toolkit print plain text. Each test waits for `>>> ` before typing; control keys are sent
after a short pause, once prompt_toolkit has put the terminal in raw mode (before that the line discipline
would read Ctrl-D as end of file).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.server import free_port, serve_subprocess

TIMEOUT_S = 90  # generous: answers take seconds, but a loaded CI machine can be several times slower
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default
PROMPT = ">>> "


def _tokens_used(meter: str) -> int:
    """The N of the `/context` line "N of M tokens used ..."."""
    match = re.search(r"(\d+) of \d+ tokens used", meter)
    assert match, meter
    return int(match.group(1))


class Chat:
    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {
            **os.environ,
            "TERM": "dumb",
            "EMBER_HOME": str(home),
            "EMBER_HOST": f"127.0.0.1:{free_port()}",  # no server: in-process, unless `env` names one
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "ember.cli.main", "run", "smollm2", *args],
            env=environment,
            encoding="utf-8",
            timeout=TIMEOUT_S,
            dimensions=(40, 200),
        )
        self.child.setecho(False)

    def prompt(self) -> str:
        """Wait for `>>> `; what was printed before it."""
        self.child.expect_exact(PROMPT)
        return ANSI.sub("", self.child.before).replace("\r\n", "\n")

    def ask(self, line: str) -> str:
        """Type a line, wait for the next prompt; the output in between."""
        self.child.sendline(line)
        return self.prompt()

    def greedy(self, num_predict: int = 24) -> None:
        self.ask("/set parameter temperature 0")
        self.ask(f"/set parameter num_predict {num_predict}")

    def key(self, char: str) -> None:
        time.sleep(0.3)  # let prompt_toolkit switch the terminal to raw mode
        self.child.send(char)

    def quit(self) -> int:
        self.key("\x04")  # Ctrl-D
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def chat(home: Path) -> Iterator[Chat]:
    session = Chat(home)
    session.prompt()
    yield session
    session.child.close(force=True)


def test_an_answer_streams_and_the_prompt_comes_back(chat: Chat) -> None:
    chat.greedy()
    answer = chat.ask("Which city is the capital of France? Answer in one word.")
    assert "Paris" in answer
    assert chat.quit() == 0


def test_set_and_show_commands(chat: Chat) -> None:
    assert "Set parameter 'temperature' to '0'" in chat.ask("/set parameter temperature 0")
    assert "Set parameter 'top_k' to '7'" in chat.ask("/set parameter top_k 7")
    refused = chat.ask("/set parameter temperature -2")
    assert "Error: invalid option temperature=-2" in refused
    assert "did you mean temperature" in chat.ask("/set parameter temprature 1")
    assert "usage: /set parameter" in chat.ask("/set parameter top_k")
    assert "Set system message." in chat.ask("/set system You are a pirate.")
    assert "You are a pirate." in chat.ask("/show system")
    parameters = chat.ask("/show parameters")
    assert "temperature" in parameters and "top_k" in parameters and "7" in parameters
    info = chat.ask("/show info")
    assert "llama" in info and "134.52M" in info and "num_ctx" in info and "4096" in info
    assert "im_start" in chat.ask("/show template")
    assert "usage: /show info | parameters | template | system" in chat.ask("/show nothing")
    assert "Unknown command '/frobnicate'. Type /? for help" in chat.ask("/frobnicate")
    help_text = chat.ask("/help")
    for command in ("/set parameter", "/show", "/clear", "/save", "/sessions", "/load", "/context", "/bye", '"""'):
        assert command in help_text
    chat.child.sendline("/bye")
    chat.child.expect(pexpect.EOF)
    chat.child.close()
    assert chat.child.exitstatus == 0


def test_a_load_option_reloads_and_context_counts_tokens(chat: Chat) -> None:
    assert "0 of 4096 tokens used" in chat.ask("/context")
    assert "Set parameter 'num_ctx' to '512'" in chat.ask("/set parameter num_ctx 512")
    assert "num_ctx             512" in chat.ask("/show info")
    chat.greedy(8)
    chat.ask("Hello")
    used = chat.ask("/context")
    assert "of 512 tokens used" in used and "2 messages" in used
    assert int(used.split(" of ")[0].split()[-1]) > 5
    assert "Cleared session context" in chat.ask("/clear")
    assert "0 of 512 tokens used" in chat.ask("/context")


def test_old_turns_are_dropped_to_fit_num_ctx(chat: Chat) -> None:
    chat.ask("/set parameter num_ctx 128")
    chat.greedy(16)
    chat.ask("Tell me about the history of the Roman empire in detail, with dates and names of the emperors.")
    chat.ask("And about the history of Greece, with the names of its philosophers and the dates.")
    answer = chat.ask("And about the history of Egypt, with the names of the pharaohs and their dynasties.")
    assert re.search(r"\(dropped [2-4] old messages to fit num_ctx 128\)", answer)
    assert "strategy sliding" in chat.ask("/context")


def test_multi_line_input(chat: Chat) -> None:
    chat.greedy()
    chat.child.sendline('"""Which city is the capital')
    chat.child.expect_exact("... ")
    chat.child.sendline("of France? Answer in one word.")
    chat.child.expect_exact("... ")
    answer = chat.ask('"""')
    assert "Paris" in answer
    assert "2 messages" in chat.ask("/context")


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(chat: Chat) -> None:
    chat.greedy(2000)
    chat.child.sendline("Tell a dragon story.")
    chat.child.expect(r"(\S+\s+){8}")  # the answer has begun (the question has four words)
    started = time.monotonic()
    chat.child.sendintr()
    chat.prompt()
    assert time.monotonic() - started < 30  # 2,000 tokens take far longer, even on a loaded machine
    meter = chat.ask("/context")
    assert "2 messages" in meter  # the partial answer is kept
    assert _tokens_used(meter) < 1000  # and it was cut short: the answer could have run to 2,000 tokens
    chat.ask("/set parameter num_predict 24")
    answer = chat.ask("Which city is the capital of France? Answer in one word.")
    assert answer.split("\n", 1)[1].strip()  # an answer after the echoed question (its wording is the model's)
    assert "4 messages" in chat.ask("/context")


def test_ctrl_c_at_the_prompt_prints_a_hint_and_ctrl_d_quits(chat: Chat) -> None:
    chat.key("\x03")
    assert "Use Ctrl + d or /bye to exit." in chat.prompt()
    assert chat.quit() == 0


def test_a_saved_session_continues_in_a_new_process(home: Path) -> None:
    first = Chat(home)
    first.prompt()
    first.greedy()
    first.ask(f"/set system {SMOLLM_SYSTEM}")
    first.ask("My name is Zed.")
    assert "Saved conversation 'zed-chat' (2 messages)." in first.ask("/save zed-chat")
    assert first.quit() == 0

    second = Chat(home)
    second.prompt()
    assert "no conversation with the id or title 'nope'" in second.ask("/load nope")
    assert "zed-chat" in second.ask("/sessions") and "No conversations with 'quokka'" in second.ask("/sessions quokka")
    assert re.search(
        r"Loaded conversation 'zed-chat' \(conv_\w+\): smollm2, 2 messages\.", second.ask("/load zed-chat")
    )
    assert SMOLLM_SYSTEM in second.ask("/show system")
    assert "temperature" in second.ask("/show parameters")
    before = _tokens_used(second.ask("/context"))
    second.ask("What is my name?")
    meter = second.ask("/context")
    assert "4 messages" in meter and _tokens_used(meter) > before > 20  # the new turn came after the saved one
    assert second.quit() == 0


def test_interactive_with_a_prompt_answers_it_first(home: Path) -> None:
    chat = Chat(home, "-i", "-p", "Which city is the capital of France? Answer in one word.", "--temp", "0", "-n", "24")
    assert "Paris" in chat.prompt()
    assert "2 messages" in chat.ask("/context")
    assert chat.quit() == 0


def test_interactive_first_waits_for_input(home: Path) -> None:
    chat = Chat(home, "--interactive-first", "--temp", "0", "-n", "24")
    assert chat.prompt().strip() == ""
    assert "0 of 4096" in chat.ask("/context")
    assert chat.quit() == 0


def test_a_reverse_prompt_ends_the_answer(home: Path) -> None:
    chat = Chat(home, "-r", ",", "--temp", "0", "-n", "40")
    chat.prompt()
    answer = chat.ask("Count from one to ten in words with a comma after each")
    assert answer.strip() and "," not in answer
    assert chat.quit() == 0


@pytest.mark.slow
def test_the_chat_goes_through_a_running_server(home: Path) -> None:
    with serve_subprocess(env={"EMBER_HOME": str(home / "server")}) as (_, server_env):
        chat = Chat(home, env={"EMBER_HOST": server_env["EMBER_HOST"]})
        chat.prompt()
        chat.greedy()
        assert "Paris" in chat.ask("Which city is the capital of France? Answer in one word.")
        used = chat.ask("/context")
        assert "of 4096 tokens used" in used and "2 messages" in used
        assert "llama" in chat.ask("/show info")
        chat.ask("/set parameter num_predict 2000")
        chat.child.sendline("Tell a dragon story.")
        chat.child.expect(r"(\S+\s+){8}")
        started = time.monotonic()
        chat.child.sendintr()
        chat.prompt()
        assert time.monotonic() - started < 5
        assert "4 messages" in chat.ask("/context")
        assert chat.quit() == 0


@pytest.mark.slow
def test_the_repl_resumes_a_conversation_made_through_the_api(home: Path) -> None:
    """Made with the HTTP API, resumed by a new REPL process through the server; the REPL's own conversation is
    then listed by the API, its turns there."""
    with serve_subprocess(env={"EMBER_HOME": str(home / "server")}) as (base, server_env):
        made = httpx.post(
            f"{base}/api/conversations",
            json={
                "title": "quokka facts",
                "options": {"temperature": 0, "num_predict": 24, "repeat_penalty": 1.0},
                "messages": [
                    {"role": "user", "content": "My pet is a quokka named Quincy."},
                    {"role": "assistant", "content": "Quincy the quokka sounds lovely!"},
                ],
            },
            timeout=60,
        ).json()["conversation"]
        chat = Chat(home, env={"EMBER_HOST": server_env["EMBER_HOST"]})
        chat.prompt()
        listed = chat.ask("/sessions quokka")
        assert made["id"] in listed and "quokka facts" in listed and "[quokka]" in listed
        assert f"Loaded conversation 'quokka facts' ({made['id']}): smollm2" in chat.ask(f"/load {made['id']}")
        chat.ask("What is the name of my pet? Answer with the name.")
        assert "4 messages" in chat.ask("/context")
        assert chat.quit() == 0
        stored = httpx.get(f"{base}/api/conversations/{made['id']}", timeout=60).json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
        assert stored[3]["info"]["context"]["messages"] == 3  # its prompt held the history made through the API

        mine = Chat(home, env={"EMBER_HOST": server_env["EMBER_HOST"]})
        mine.prompt()
        mine.greedy(8)
        mine.ask("Hello from the terminal.")
        assert mine.quit() == 0
        rows = httpx.get(f"{base}/api/conversations", params={"origin": "repl"}, timeout=60).json()["conversations"]
        assert [row["title"] for row in rows] == ["Hello from the terminal."] and rows[0]["message_count"] == 2
