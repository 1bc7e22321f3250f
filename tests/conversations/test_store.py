"""The conversation store: the message tree, search, pins, fork, export/import, migration, and durability."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ember.conversations.db import ConversationStoreError
from ember.conversations.records import ConversationNotFoundError
from ember.conversations.store import ConversationStore, NewMessage, default_path
from ember.conversations.transfer import ConversationDocument, export_conversation, import_conversation
from ember.errors import InvalidRequestError


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    return ConversationStore(tmp_path / "ember.db")


def chain(store: ConversationStore, conversation_id: str, *texts: str) -> list[str]:
    roles = ["user", "assistant"]
    messages = [NewMessage(roles[i % 2], text) for i, text in enumerate(texts)]
    leaf = store.get(conversation_id).active_leaf
    return [m.id for m in store.append(conversation_id, leaf, messages)]


def shape(store: ConversationStore, conversation_id: str) -> list[tuple[int | None, str, str, bool]]:
    """The tree as (index of the parent, role, content, pinned), independent of ids."""
    messages = [m for m in store.messages(conversation_id) if m.kind == "message"]
    index = {m.id: i for i, m in enumerate(messages)}
    return [(index.get(m.parent_id or ""), m.role, m.content, m.pinned) for m in messages]


def test_a_conversation_round_trips(store: ConversationStore) -> None:
    made = store.create(model="smollm2", title="  demo   chat ", system="Be brief.", options={"temperature": 0})
    ids = chain(store, made.id, "Hi", "Hello!", "How are you?")
    conversation = store.get(made.id)
    assert conversation.title == "demo chat" and conversation.system == "Be brief."
    assert conversation.options == {"temperature": 0} and conversation.active_leaf == ids[-1]
    branch = store.branch(made.id)
    assert [(m.role, m.content) for m in branch] == [("user", "Hi"), ("assistant", "Hello!"), ("user", "How are you?")]
    assert [m.parent_id for m in branch] == [None, ids[0], ids[1]]


def test_the_database_is_wal_under_ember_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / "ember.db"
    store = ConversationStore()
    store.create(model="m")
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_siblings_and_the_active_branch(store: ConversationStore) -> None:
    conversation = store.create(model="m")
    question, first_answer = chain(store, conversation.id, "Q", "A1")
    (second_answer,) = [m.id for m in store.append(conversation.id, question, [NewMessage("assistant", "A2")])]
    assert [m.content for m in store.branch(conversation.id)] == ["Q", "A2"]
    store.set_active(conversation.id, first_answer)
    assert [m.content for m in store.branch(conversation.id)] == ["Q", "A1"]
    parents = {m.id: m.parent_id for m in store.messages(conversation.id)}
    assert parents[first_answer] == parents[second_answer] == question
    with pytest.raises(ConversationNotFoundError):
        store.set_active(conversation.id, "msg_" + "0" * 24)


def test_a_failed_append_writes_nothing(store: ConversationStore) -> None:
    conversation = store.create(model="m")
    chain(store, conversation.id, "Q")
    before = shape(store, conversation.id)
    with pytest.raises(InvalidRequestError):
        store.append(conversation.id, None, [NewMessage("user", "ok"), NewMessage("robot", "bad")])
    with pytest.raises(ConversationNotFoundError):
        store.append(conversation.id, "msg_" + "f" * 24, [NewMessage("user", "orphan")])
    assert shape(store, conversation.id) == before


def test_fork_copies_the_branch_and_remove_keeps_the_children(store: ConversationStore) -> None:
    conversation = store.create(model="m", title="original")
    ids = chain(store, conversation.id, "one", "two", "three", "four")
    fork = store.fork(conversation.id, ids[1], title="fork")
    assert fork.id != conversation.id and fork.title == "fork"
    assert [m.content for m in store.branch(fork.id)] == ["one", "two"]
    store.remove_message(conversation.id, ids[1])
    assert [m.content for m in store.branch(conversation.id)] == ["one", "three", "four"]
    store.remove_message(conversation.id, ids[3])  # the active leaf: the branch now ends at its parent
    assert [m.content for m in store.branch(conversation.id)] == ["one", "three"]


def test_search_pages_and_snippets(store: ConversationStore) -> None:
    for n in range(5):
        conversation = store.create(model="m", title=f"chat {n}")
        chain(store, conversation.id, f"message number {n}", "the capital of France is Paris" if n % 2 else "ok")
    rows, total = store.list(limit=2)
    assert total == 5 and [row.title for row in rows] == ["chat 4", "chat 3"]
    assert [row.title for row in store.list(limit=2, offset=4)[0]] == ["chat 0"]
    found, total = store.list(query="capital Paris")
    assert total == 2 and {row.title for row in found} == {"chat 1", "chat 3"}
    assert all("[Paris]" in (row.snippet or "") for row in found)
    assert [row.title for row in store.list(query="chat 2")[0]] == ["chat 2"]  # the title matches
    assert store.list(query='" OR * NEAR(')[1] == 0  # operators are words, never FTS5 syntax
    assert store.list(query="%")[1] == 0


def test_pins_and_token_counts(store: ConversationStore) -> None:
    conversation = store.create(model="m")
    first, _ = chain(store, conversation.id, "remember this", "ok")
    assert store.set_pinned(conversation.id, first, True).pinned
    store.set_token_counts([(first, 7, "sha256:x")])
    message = store.message(conversation.id, first)
    assert message.pinned and message.token_count == 7 and message.token_model == "sha256:x"


def test_bm25_relevance_ranks_matching_messages(store: ConversationStore) -> None:
    conversation = store.create(model="m")
    ids = chain(store, conversation.id, "my dog is called Rex", "nice", "the weather is cold", "brr")
    scores = store.index.relevance(ids, "what is the name of my dog?")
    assert ids[0] in scores and scores[ids[0]] > scores.get(ids[2], 0) and ids[1] not in scores


def test_export_then_import_gives_the_same_tree(store: ConversationStore) -> None:
    conversation = store.create(model="m", title="tree", system="sys", strategy="summarize")
    question, _ = chain(store, conversation.id, "Q", "A1")
    store.append(conversation.id, question, [NewMessage("assistant", "A2", pinned=True)])
    store.add_summary(conversation.id, "they talked", {"through": question, "covers": [question]})
    document = export_conversation(store, conversation.id)
    copy = store.get(import_conversation(store, ConversationDocument.model_validate(document)))
    assert copy.id != conversation.id and copy.origin == "import"
    assert (copy.title, copy.system, copy.strategy) == ("tree", "sys", "summarize")
    assert shape(store, copy.id) == shape(store, conversation.id)
    assert [m.content for m in store.branch(copy.id)] == ["Q", "A2"]
    summary = next(m for m in store.messages(copy.id) if m.kind == "summary")
    assert store.message(copy.id, summary.info["through"]).content == "Q"


def test_import_refuses_a_document_whose_parents_come_later(store: ConversationStore) -> None:
    document = ConversationDocument.model_validate(
        {
            "conversation": {"title": "bad"},
            "messages": [
                {"id": "a", "parent_id": "b", "role": "user", "content": "x"},
                {"id": "b", "parent_id": None, "role": "user", "content": "y"},
            ],
        }
    )
    with pytest.raises(InvalidRequestError, match="must come before it"):
        import_conversation(store, document)
    assert store.list()[1] == 0


LEGACY_SCHEMA = """
CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, model TEXT NOT NULL, system TEXT,
    options TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL);
CREATE TABLE messages (session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (session_id, position));
INSERT INTO sessions VALUES (1, 'zed-chat', 'smollm2', 'Be kind.', '{"temperature": 0}', 1700000000);
INSERT INTO messages VALUES (1, 0, 'user', 'My name is Zed.'), (1, 1, 'assistant', 'Hello Zed!');
INSERT INTO sessions VALUES (2, 'empty', 'smollm2', NULL, '{}', 1700000001);
"""


def test_saved_repl_sessions_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    with sqlite3.connect(path) as db:
        db.executescript(LEGACY_SCHEMA)
    store = ConversationStore(path)
    zed = store.find("zed-chat")
    assert (zed.model, zed.system, zed.options, zed.origin) == ("smollm2", "Be kind.", {"temperature": 0}, "repl")
    history = [(m.role, m.content) for m in store.branch(zed.id)]
    assert history == [("user", "My name is Zed."), ("assistant", "Hello Zed!")]
    assert store.branch(store.find("empty").id) == []
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "sessions" not in tables and "legacy_session_messages" not in tables
    assert ConversationStore(path).list()[1] == 2  # opening again migrates nothing twice


def test_two_processes_and_threads_write_at_once(store: ConversationStore) -> None:
    conversation = store.create(model="m")
    script = (
        "import sys; from ember.conversations.store import ConversationStore, NewMessage\n"
        "store = ConversationStore(sys.argv[1])\n"
        "for i in range(20):\n"
        "    store.append(sys.argv[2], None, [NewMessage('user', f'p{i}')], make_active=False)\n"
        "    store.create(model='m', title=f'p-{i}')\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(store.path), conversation.id]) for _ in range(2)]
    errors: list[BaseException] = []

    def write() -> None:
        try:
            mine = ConversationStore(store.path)
            for i in range(20):
                mine.append(conversation.id, None, [NewMessage("user", f"t{i}")], make_active=False)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    assert errors == []
    messages = store.messages(conversation.id)
    assert len(messages) == 80 and len({m.seq for m in messages}) == 80
    assert store.list()[1] == 41


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConversationStoreError, match="damaged or not a database") as caught:
        ConversationStore(path).list()
    assert str(path) in str(caught.value)


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConversationStoreError, match="cannot open the conversation database"):
        ConversationStore(blocker / "sub" / "ember.db").list()


def test_malformed_ids_are_not_found(store: ConversationStore) -> None:
    for bad in ("x", "conv_' OR 1=1 --", "msg_" + "0" * 24, "../../etc"):
        with pytest.raises(ConversationNotFoundError, match="no conversation"):
            store.get(bad)
