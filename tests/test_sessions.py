"""The SQLite session store: round trips, replacement, listing, deletion, names, concurrency, damage."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ember.errors import InvalidRequestError
from ember.sessions import Session, SessionError, SessionNotFoundError, SessionStore, check_session_name

MESSAGES = [{"role": "user", "content": "My name is Zed."}, {"role": "assistant", "content": "Hello Zed!"}]


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "ember.db")


def test_a_session_round_trips(store: SessionStore) -> None:
    saved = store.save(
        Session(
            name="zed",
            model="smollm2",
            system="Be brief.",
            options={"temperature": 0, "stop": ["a"]},
            messages=MESSAGES,
        )
    )
    loaded = store.load("zed")
    assert loaded == saved
    assert (loaded.model, loaded.system, loaded.options, loaded.messages) == (
        "smollm2",
        "Be brief.",
        {"temperature": 0, "stop": ["a"]},
        MESSAGES,
    )
    assert loaded.updated_at > 0


def test_the_database_is_in_wal_mode_at_the_given_path(store: SessionStore) -> None:
    store.save(Session(name="x", model="m"))
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {
            "sessions",
            "messages",
        }


def test_the_default_path_is_under_ember_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    assert SessionStore().path == tmp_path / "home" / "ember.db"


def test_saving_again_replaces_the_session(store: SessionStore) -> None:
    store.save(Session(name="s", model="a", messages=MESSAGES))
    store.save(Session(name="s", model="b", messages=MESSAGES[:1]))
    loaded = store.load("s")
    assert loaded.model == "b" and loaded.messages == MESSAGES[:1]
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1  # no orphans left


def test_a_failed_save_leaves_the_old_session(store: SessionStore) -> None:
    store.save(Session(name="s", model="a", messages=MESSAGES))
    with pytest.raises(InvalidRequestError):
        store.save(Session(name="s", model="b", messages=[{"role": "user", "content": None}]))  # type: ignore[dict-item]
    assert store.load("s").messages == MESSAGES


def test_list_and_delete(store: SessionStore) -> None:
    assert store.list() == []
    store.save(Session(name="one", model="m", messages=MESSAGES))
    store.save(Session(name="two", model="n"))
    listed = store.list()
    assert [(s.name, s.model, s.message_count) for s in listed] == [("two", "n", 0), ("one", "m", 2)]
    store.delete("one")
    assert [s.name for s in store.list()] == ["two"]
    with pytest.raises(SessionNotFoundError, match="no saved session named 'one'"):
        store.delete("one")
    with pytest.raises(SessionNotFoundError, match="no saved session named 'one'"):
        store.load("one")


@pytest.mark.parametrize("name", ["", "a b", "../x", "a/b", "x" * 65, "név", "semi;colon"])
def test_invalid_names_are_refused(store: SessionStore, name: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid session name"):
        store.save(Session(name=name, model="m"))
    with pytest.raises(InvalidRequestError, match="invalid session name"):
        store.load(name)


def test_valid_names() -> None:
    for name in ("a", "A-b_c.d", "x" * 64, "2024.01.01"):
        assert check_session_name(name) == name


def test_two_processes_and_threads_write_at_once(store: SessionStore) -> None:
    script = (
        "import sys; from ember.sessions import Session, SessionStore\n"
        "store = SessionStore(sys.argv[1])\n"
        "for i in range(30):\n"
        "    message = {'role': 'user', 'content': str(i)}\n"
        "    store.save(Session(name=f'p{sys.argv[2]}-{i % 5}', model='m', messages=[message]))\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(store.path), str(n)]) for n in range(2)]
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(30):
                SessionStore(store.path).save(Session(name=f"t{n}", model="m", messages=MESSAGES * (i % 3)))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    assert errors == []
    names = {s.name for s in store.list()}
    assert names == {f"p{n}-{i}" for n in range(2) for i in range(5)} | {"t0", "t1"}
    assert store.load("p0-4").messages == [{"role": "user", "content": "29"}]


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SessionError, match="damaged or not a database") as caught:
        SessionStore(path).load("x")
    assert str(path) in str(caught.value)


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SessionError, match="cannot open the session database"):
        SessionStore(blocker / "sub" / "ember.db").list()
