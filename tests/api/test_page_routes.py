"""The server side of the web page against a real server and the real default model: prefill progress in a
stream, continuing an answer, documents (upload, extraction, retrieval and citation sources), presets, /api/stats,
and the page's own files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ember.api.web import PAGE_ROOT, PageFileNotFoundError, page_file
from tests.server import running_server

OPTIONS = {"num_ctx": 1024, "num_predict": 6, "temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        running_server(home=tmp_path_factory.mktemp("page-home"), num_parallel=2) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        yield client


def create(api: httpx.Client, **fields: Any) -> str:
    response = api.post("/api/conversations", json={"options": OPTIONS, **fields})
    assert response.status_code == 200, response.text
    return response.json()["conversation"]["id"]


def lines_of(api: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with api.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def pdf_with_text(text: str) -> bytes:
    """A minimal one-page PDF showing `text` in Helvetica (written by hand: pypdf reads, it does not typeset)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_a_long_prompt_streams_its_prefill_progress_first(api: httpx.Client) -> None:
    conversation = create(api)
    long_message = "Summarize this. " + " ".join(f"word{n}" for n in range(150))  # about 600 tokens
    lines = lines_of(api, f"/api/conversations/{conversation}/chat", {"content": long_message, "progress": True})
    progress = [line["prefill"] for line in lines if "prefill" in line]
    # Prefill runs in whole num_batch (512) chunks: a 600-token prompt reports after its first chunk.
    assert progress, "a prompt longer than one prefill chunk reports its progress"
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert all(0 < p["done"] < p["total"] for p in progress)
    final = lines[-1]
    assert progress[-1]["total"] == final["prompt_eval_count"] + final["prompt_cached_count"]
    first_text = next(i for i, line in enumerate(lines) if line.get("message", {}).get("content"))
    assert all("prefill" not in line for line in lines[first_text:])
    without = lines_of(api, f"/api/conversations/{conversation}/chat", {"content": long_message[:200]})
    assert not any("prefill" in line for line in without)  # only when asked


def test_continue_writes_more_of_the_same_answer(api: httpx.Client) -> None:
    conversation = create(api)
    lines_of(api, f"/api/conversations/{conversation}/chat", {"content": "Count from one to twenty in words."})
    first = api.get(f"/api/conversations/{conversation}").json()["messages"][-1]
    assert first["info"]["done_reason"] == "length"
    lines = lines_of(api, f"/api/conversations/{conversation}/messages/{first['id']}/continue", {})
    assert lines[-1]["message_id"] == first["id"]
    messages = api.get(f"/api/conversations/{conversation}").json()["messages"]
    assert len(messages) == 2 and messages[1]["id"] == first["id"]
    added = "".join(line["message"]["content"] for line in lines)  # the last line carries text too
    assert added and messages[1]["content"] == first["content"] + added
    assert messages[1]["status"] == "completed" and messages[1]["info"]["eval_count"] >= 1
    user = messages[0]["id"]
    refused = api.post(f"/api/conversations/{conversation}/messages/{user}/continue", json={})
    assert refused.status_code == 400 and "only an answer" in refused.json()["error"]


def test_documents_are_read_chunked_listed_and_cited(api: httpx.Client) -> None:
    conversation = create(api, options={**OPTIONS, "num_predict": 12})
    html = (
        "<html><head><script>alert(1)</script><style>p{}</style></head>"
        "<body><p>The Zorblat code is PURPLE-42.</p></body></html>"
    )
    files = [
        ("file", ("notes.html", html.encode(), "text/html")),
        ("file", ("spec.pdf", pdf_with_text("Varnholm hosts the Zorblat festival every spring"), "application/pdf")),
    ]
    response = api.post("/api/documents", data={"conversation_id": conversation}, files=files)
    assert response.status_code == 200, response.text
    html_doc, pdf_doc = response.json()["documents"]
    assert html_doc["media_type"] == "text/html" and pdf_doc["media_type"] == "application/pdf"
    text = api.get(f"/api/documents/{html_doc['id']}").json()["document"]["text"]
    assert text == "The Zorblat code is PURPLE-42." and "alert" not in text
    assert "Varnholm" in api.get(f"/api/documents/{pdf_doc['id']}").json()["document"]["text"]

    lines = lines_of(api, f"/api/conversations/{conversation}/chat", {"content": "What is the Zorblat code?"})
    answer = api.get(f"/api/conversations/{conversation}").json()["messages"][-1]
    assert answer["id"] == lines[-1]["message_id"]
    assert answer["info"]["documents"]["mode"] == "whole"
    assert [source["name"] for source in answer["info"]["sources"]] == ["notes.html", "spec.pdf"]
    assert lines[-1]["prompt_eval_count"] + lines[-1]["prompt_cached_count"] > 60  # the sources are in the prompt

    bad = api.post("/api/documents", data={"collection": "x"}, files=[("file", ("a.exe", b"MZ", "application/x"))])
    assert bad.status_code == 400 and ".pdf" in bad.json()["error"]
    both = api.post("/api/documents", files=[("file", ("a.txt", b"hi", "text/plain"))])
    assert both.status_code == 400 and "collection or a conversation_id" in both.json()["error"]
    assert api.delete(f"/api/documents/{pdf_doc['id']}").json()["deleted"] is True
    assert api.get(f"/api/documents/{pdf_doc['id']}").status_code == 404


def test_a_collection_too_large_for_the_context_is_retrieved_by_passages(api: httpx.Client) -> None:
    conversation = create(api, options={**OPTIONS, "num_predict": 4}, metadata={"collections": ["atlas"]})
    filler = "\n\n".join(f"Section {n}. The weather in region {n} is mild and the hills are green." for n in range(120))
    secret = "\n\nSection 999. The lighthouse keeper of Ostmark is named Ilse Brandt.\n\n"
    data = (filler[: len(filler) // 2] + secret + filler[len(filler) // 2 :]).encode()
    upload = [("file", ("atlas.md", data, "text/markdown"))]
    response = api.post("/api/documents", data={"collection": "atlas"}, files=upload)
    assert response.status_code == 200, response.text
    assert response.json()["documents"][0]["chunks"] > 5
    assert "atlas" in api.get("/api/documents").json()["collections"]
    lines_of(api, f"/api/conversations/{conversation}/chat", {"content": "Who is the lighthouse keeper of Ostmark?"})
    answer = api.get(f"/api/conversations/{conversation}").json()["messages"][-1]
    documents = answer["info"]["documents"]
    assert documents["mode"] == "retrieval" and "do not fit" in documents["reason"]
    assert "Ilse Brandt" in answer["info"]["sources"][0]["text"]  # BM25 and vectors, fused, rank it first
    assert all("chunk_id" in source for source in answer["info"]["sources"])


def test_presets_are_kept_by_name(api: httpx.Client) -> None:
    saved = api.put("/api/presets/Pirate", json={"system": "Arr.", "options": {"temperature": 0.5}})
    assert saved.status_code == 200 and saved.json()["preset"]["options"] == {"temperature": 0.5}
    api.put("/api/presets/Pirate", json={"system": "Arr!", "options": {}})
    assert [p["system"] for p in api.get("/api/presets").json()["presets"] if p["name"] == "Pirate"] == ["Arr!"]
    bad = api.put("/api/presets/Pirate", json={"options": {"temperature": "hot"}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]
    assert api.put("/api/presets/%20", json={}).status_code == 400
    assert api.delete("/api/presets/Pirate").json()["deleted"] is True
    assert api.delete("/api/presets/Pirate").status_code == 404


def test_stats_count_the_answers_of_the_last_minute(api: httpx.Client) -> None:
    before = api.get("/api/stats").json()
    conversation = create(api)
    lines_of(api, f"/api/conversations/{conversation}/chat", {"content": "Hi"})
    after = api.get("/api/stats").json()
    assert after["answers_total"] == before["answers_total"] + 1
    assert after["tokens_total"] >= before["tokens_total"] + 1 and after["tokens_per_second"] > 0
    assert after["slots"] >= 2 and after["memory"]["total"] > 0 and after["models"][0]["name"].startswith("smollm2")


def test_the_page_and_its_files(api: httpx.Client) -> None:
    page = api.get("/", headers={"Accept": "text/html"})
    assert (
        page.headers["content-type"].startswith("text/html")
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    assert api.get("/").text == "ember is running"  # what Ollama's clients read
    script = api.get("/web/js/main.js")
    assert script.headers["content-type"].startswith("text/javascript") and "import" in script.text
    for licence in ("LICENSE.marked", "LICENSE.dompurify", "LICENSE.highlightjs"):  # shipped with the libraries
        assert (PAGE_ROOT / "vendor" / licence).read_text().strip()
    for outside in ("../api/web.py", "__init__.py", "vendor/../../api/app.py", "missing.js"):
        with pytest.raises(PageFileNotFoundError):
            page_file(outside)
    assert api.get("/web/__init__.py").status_code == 404
