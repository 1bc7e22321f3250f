"""The disk tier of the KV cache: files on their own, the scheduler's index, and a conversation that comes back
after its model was unloaded and loaded again (the real model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ember
from ember.config import Settings
from ember.engine.kv_disk import DiskCache
from ember.engine.scheduler import HostCache
from tests.conftest import greedy

DATA = bytes(range(256)) * 4  # stands in for llama.cpp's sequence state


def test_entries_round_trip_and_a_prefix_of_another_is_not_kept(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "kv", budget=1 << 20)
    assert cache.write_all([([1, 2, 3], DATA), ([1, 2, 3, 4, 5], DATA + b"x"), ([7, 8], DATA)]) == 2
    entries = cache.entries(num_ctx=4096)
    assert sorted(entry.tokens for entry in entries) == [[1, 2, 3, 4, 5], [7, 8]]
    longer = next(entry for entry in entries if entry.tokens[0] == 1)
    assert cache.read(longer) == bytearray(DATA + b"x")
    assert not longer.path.exists()  # the KV lives in a slot now; it is written again at the next close
    assert [entry.tokens for entry in cache.entries(num_ctx=4096)] == [[7, 8]]
    assert cache.entries(num_ctx=2) == []  # an entry as long as the context cannot be restored into it


def test_the_budget_keeps_the_first_entries_given_and_drops_the_oldest_files(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, budget=2 * len(DATA))
    cache.write_all([([1], DATA), ([2], DATA)])
    assert cache.write_all([([3], DATA), ([4], DATA), ([5], DATA)]) == 2  # the third does not fit
    assert sorted(entry.tokens for entry in cache.entries(4096)) == [[3], [4]]  # the older files went


def test_damaged_files_are_dropped_and_never_raise(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, budget=1 << 20)
    cache.write_all([([1, 2], DATA)])
    (tmp_path / "garbage.kv").write_bytes(b"not a KV file")
    (entry,) = cache.entries(4096)
    assert not (tmp_path / "garbage.kv").exists()
    entry.path.write_bytes(entry.path.read_bytes()[:-10])  # a truncated write
    assert cache.read(entry) == bytearray()
    assert DiskCache(tmp_path, budget=0).write_all([([1], DATA)]) == 0  # off: nothing written
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    assert DiskCache(blocked / "kv", budget=1 << 20).write_all([([1], DATA)]) == 0


def test_disk_entries_use_no_ram_budget_and_are_never_evicted_for_ram() -> None:
    host = HostCache(budget=1000)
    on_disk = host.add_disk([1, 2, 3, 4], size=800)  # most of the RAM budget, were it in RAM
    assert host.used == 0
    assert host.best([1, 2, 3, 4, 9]) == (host.entries[on_disk], 4)
    in_ram = host.add([5, 6, 7], now=1)
    assert in_ram is not None
    host.saved(in_ram, 900)
    assert host.add([8, 9], now=2) is not None  # room made by evicting the RAM entry, not the disk one
    assert on_disk in host.entries and in_ram not in host.entries


@pytest.fixture
def disk_tier(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBER_KV_CACHE_DISK", str(256 << 20))
    folder = Settings().home / "kv"
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _chat(model: ember.Model, messages: list[dict[str, str]]) -> ember.ChatResponse:
    return model.chat(messages, **greedy(num_predict=24))


SYSTEM = {"role": "system", "content": "You are a patient geography teacher. Answer in two sentences."}
FIRST = [SYSTEM, {"role": "user", "content": "Which river is the longest in Africa?"}]


def test_a_conversation_comes_back_from_disk_after_its_model_reloads(disk_tier: Path) -> None:
    with ember.Model("smollm2", num_ctx=512, deterministic=True) as model:
        first = _chat(model, FIRST)
    (written,) = list(disk_tier.rglob("*.kv"))
    second_turn = [
        *FIRST,
        {"role": "assistant", "content": first.message.content},
        {"role": "user", "content": "Which countries does it flow through?"},
    ]
    with ember.Model("smollm2", num_ctx=512, deterministic=True) as model:
        scheduler = model.loaded.engine.scheduler
        assert [entry.on_disk for entry in scheduler.host.entries.values()] == [True]
        restored = _chat(model, second_turn)
        assert not written.exists()  # read into the slot
    # The first turn came back from disk; only the new turn was prefilled. The model wrote its slot again.
    assert restored.prompt_cached_count >= first.prompt_eval_count + first.prompt_cached_count
    assert len(list(disk_tier.rglob("*.kv"))) == 1

    shutil.rmtree(disk_tier)
    with ember.Model("smollm2", num_ctx=512, deterministic=True) as model:
        fresh = _chat(model, second_turn)
    assert fresh.prompt_cached_count == 0
    assert fresh.message.content == restored.message.content


def test_a_damaged_kv_file_is_prefilled_instead(disk_tier: Path) -> None:
    with ember.Model("smollm2", num_ctx=512, deterministic=True) as model:
        first = _chat(model, FIRST)
    (written,) = list(disk_tier.rglob("*.kv"))
    written.write_bytes(written.read_bytes()[:-4096])  # the header reads; the KV bytes do not
    with ember.Model("smollm2", num_ctx=512, deterministic=True) as model:
        again = _chat(model, FIRST)
    assert again.prompt_cached_count == 0
    assert again.message.content == first.message.content
