"""Documents without a model: text extraction, chunking with overlap, reciprocal rank fusion, BM25 over chunks,
and the server's rolling numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.conversations.documents import DocumentError, chunk_text, extract_text, html_text, media_type_of
from ember.conversations.sources import fuse
from ember.conversations.store import ConversationStore
from ember.serve.stats import ServerStats


@given(st.text(alphabet=st.sampled_from("ab \n."), min_size=1, max_size=3000))
def test_chunks_cover_the_text_in_order_and_overlap(text):
    chunks = chunk_text(text, size=200, overlap=40)
    if not text.strip():
        assert chunks == []
        return
    starts = [start for start, _ in chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for start, piece in chunks:
        assert len(piece) <= 200 and text.index(piece, start) - start <= 200
    covered = set()
    for start, piece in chunks:
        offset = text.index(piece, start)
        covered.update(range(offset, offset + len(piece)))
    assert all(index in covered for index, char in enumerate(text) if not char.isspace())


def test_chunks_break_at_paragraphs_and_words():
    text = " ".join(f"word{n}" for n in range(300))
    chunks = chunk_text(text, size=120, overlap=30)
    assert all(not piece.startswith("ord") and piece.split()[0].startswith("word") for _, piece in chunks)
    first_end = chunks[0][1].split()[-1]
    assert first_end in chunks[1][1]  # the overlap repeats the edge


def test_html_and_types():
    assert html_text("<p>One<script>x()</script></p><p>Two &amp; three</p>").split() == ["One", "Two", "&", "three"]
    assert media_type_of("notes.MD", None) == "text/markdown"
    assert media_type_of("upload", "text/html; charset=utf-8") == "text/html"
    with pytest.raises(DocumentError, match=r"\.pdf"):
        media_type_of("photo.jpg", "image/jpeg")
    with pytest.raises(DocumentError, match="no text"):
        extract_text(b"   \n ", "text/plain", "empty.txt")
    with pytest.raises(DocumentError, match="not a readable PDF"):
        extract_text(b"%PDF-1.4 garbage", "application/pdf", "broken.pdf")


def test_reciprocal_rank_fusion_favours_what_both_rankings_put_high():
    assert fuse([["a", "b", "c"], ["b", "c", "a"]])[0] == "b"
    assert fuse([["a"], []]) == ["a"]
    assert fuse([["x", "y"], ["y", "z"]]) == ["y", "x", "z"]


def test_bm25_over_the_chunks_of_the_given_documents(tmp_path):
    store = ConversationStore(tmp_path / "ember.db")
    text = "Apples are red.\n\n" * 30 + "The lighthouse keeper is Ilse.\n\n" + "Pears are green.\n\n" * 30
    atlas = store.documents.add("atlas.txt", text.encode(), collection="atlas")
    other = store.documents.add("other.txt", b"The lighthouse is tall.", collection="other")
    found = store.documents.bm25([atlas.id], "who keeps the lighthouse", 5)
    chunks = {chunk.id: chunk for chunk in store.documents.chunks([atlas.id, other.id])}
    assert "Ilse" in chunks[found[0]].text and all(chunks[c].document_id == atlas.id for c in found)
    assert [d.name for d in store.documents.in_scope("conv_" + "0" * 24, ["atlas"])] == ["atlas.txt"]
    store.documents.delete(atlas.id)
    assert store.documents.chunks([atlas.id]) == [] and store.documents.collections() == ["other"]


def test_server_stats_keep_the_last_minute():
    now = [100.0]
    stats = ServerStats(clock=lambda: now[0], window=60)

    class Final:
        model, eval_count, eval_duration, prompt_eval_count = "m", 50, 2_000_000_000, 10

    now[0] = 130.0
    stats.record(Final())
    snapshot = stats.snapshot()
    assert snapshot["answers"] == 1 and snapshot["tokens_per_second"] == pytest.approx(50 / 30)
    assert snapshot["decode_tokens_per_second"] == pytest.approx(25)
    now[0] = 200.0
    assert stats.snapshot()["answers"] == 0 and stats.snapshot()["tokens_total"] == 50
