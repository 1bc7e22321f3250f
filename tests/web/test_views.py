"""The notebook, documents and admin views in a real browser, and the page on a phone-sized screen."""

from __future__ import annotations

import time

from tests.gguf_files import write_tiny_gguf
from tests.http_server import FileServer
from tests.web.conftest import api, current_conversation, open_page, send, set_options

ZORBLAT = (
    "Festival notes.\n\nThe secret code of the Zorblat festival is PURPLE-42. The festival is held every spring "
    "in the town of Varnholm, by the lake.\n"
)


def test_notebook_continues_the_text_counts_tokens_and_shows_next_token_probabilities(page, screenshots):
    open_page(page)
    set_options(page, num_predict="8")
    page.click("nav.views [data-view=notebook]")
    page.fill("#nb-text", "The capital of France is")
    page.wait_for_function("() => /^[1-9][0-9]* tokens$/.test(document.querySelector('#nb-count').textContent)")
    counted = int(page.locator("#nb-count").inner_text().split()[0])
    tokenized = api(page, "POST", "/api/tokenize", json={"model": "smollm2", "content": "The capital of France is"})
    assert counted == len(tokenized["tokens"])

    page.click("#nb-generate")
    page.wait_for_selector("#nb-stop", state="visible")
    page.wait_for_selector("#nb-generate", state="visible", timeout=120_000)
    text = page.input_value("#nb-text")
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
    page.wait_for_function(f"() => parseInt(document.querySelector('#nb-count').textContent) > {counted}")

    page.fill("#nb-text", "The capital of France is")
    page.evaluate("() => { const t = document.querySelector('#nb-text'); t.setSelectionRange(99, 99); }")
    page.click("#nb-probs")
    page.wait_for_selector("#nb-probs-list li")
    assert page.locator("#nb-probs-list li").count() == 10
    page.wait_for_function(f"() => document.querySelector('#nb-count').textContent === '{counted} tokens'")
    first = page.locator("#nb-probs-list li").first
    token = first.get_attribute("data-token")
    assert first.locator(".probability").inner_text().endswith("%")
    page.screenshot(path=str(screenshots / "notebook.png"))
    first.click()
    assert page.input_value("#nb-text") == "The capital of France is" + token


def test_a_document_is_uploaded_and_the_answer_cites_it(page, screenshots, tmp_path):
    notes = tmp_path / "zorblat.md"
    notes.write_text(ZORBLAT)
    open_page(page)
    set_options(page, num_predict="24")
    send(page, "Hello")
    conversation = current_conversation(page)
    page.click("nav.views [data-view=documents]")
    page.wait_for_selector("#doc-target option[value=conversation]", state="attached")
    page.set_input_files("#doc-file", str(notes))
    page.click("#doc-upload button[type=submit]")
    page.wait_for_selector("#doc-list tr[data-id]")
    assert "zorblat.md" in page.locator("#doc-list").inner_text()
    (document,) = api(page, "GET", f"/api/documents?conversation_id={conversation}")["documents"]
    assert document["name"] == "zorblat.md" and document["chunks"] >= 1
    page.screenshot(path=str(screenshots / "documents.png"))

    page.click("nav.views [data-view=chat]")
    send(page, "What is the secret code of the Zorblat festival?")
    answer = page.locator(".msg.assistant").last
    sources = answer.locator(".msg-sources .citation")
    assert sources.first.inner_text() == "[1] zorblat.md"
    stored = api(page, "GET", f"/api/conversations/{conversation}")["messages"][-1]
    assert stored["info"]["documents"]["mode"] == "whole"
    assert "PURPLE-42" in stored["info"]["sources"][0]["text"]
    page.screenshot(path=str(screenshots / "cited-answer.png"))
    inline = answer.locator(".msg-body .citation")  # the model's own [1], when it wrote one
    (inline.first if inline.count() else sources.first).click()
    page.wait_for_selector("#source-dialog[open]")
    assert "PURPLE-42" in page.locator("#source-text").inner_text()
    page.screenshot(path=str(screenshots / "citation.png"))
    page.click("#source-dialog button")


def test_admin_pulls_with_progress_and_cancel_unloads_and_shows_the_server(page, screenshots, tmp_path):
    model_file = write_tiny_gguf(tmp_path / "tiny-web.gguf", tensors=60)
    data = model_file.read_bytes()
    open_page(page)
    set_options(page)
    send(page, "Hi")  # the default model is loaded now
    page.click("nav.views [data-view=admin]")
    page.wait_for_selector("#ps-list tr[data-name]")
    assert "smollm2" in page.locator("#ps-list").inner_text()

    with FileServer() as files:
        files.files["/models/tiny-web.gguf"] = data
        page.fill("#pull-name", files.url("/models/tiny-web.gguf"))

        def stalled_pull(after: int) -> None:
            """Start the pull, have the file server stall after `after` more bytes, cancel it in the page."""
            files.interrupt_next_after(after, stall_s=3.0)
            page.click("#pull-form button[type=submit]")
            page.wait_for_selector("#pull-cancel", state="visible")
            page.wait_for_function("() => document.querySelector('#pull-progress span').textContent.includes('%')")

        stalled_pull(len(data) // 3)
        page.click("#pull-cancel")
        page.wait_for_function("() => document.querySelector('#pull-progress span').textContent === 'pull cancelled'")
        assert not any("tiny-web" in row["name"] for row in api(page, "GET", "/api/tags")["models"])
        time.sleep(3.5)  # the stalled connection ends; the first pull's worker keeps what it got, for a resume

        stalled_pull(len(data) // 3)  # resumes a third of the way in: the bar shows it
        share = page.locator("#pull-progress progress").evaluate("bar => bar.value")
        assert 0.2 < share < 0.9, share
        page.click("#pull-cancel")
        time.sleep(3.5)
        page.click("#pull-form button[type=submit]")  # the third try finishes
        page.wait_for_function(
            "() => document.querySelector('#pull-progress span').textContent === 'success'", timeout=60_000
        )
    assert page.locator("#pull-progress progress").evaluate("bar => bar.value") == 1
    page.wait_for_selector("#model-list tr[data-name^=tiny-web]")
    name = page.locator("#model-list tr[data-name^=tiny-web]").get_attribute("data-name")

    page.locator(f"#model-list tr[data-name='{name}'] [data-action=show]").click()
    page.wait_for_selector("#model-details:not([hidden])")
    assert '"family": "llama"' in page.locator("#model-details").inner_text()
    page.once("dialog", lambda dialog: dialog.accept("tiny-copy"))
    page.locator(f"#model-list tr[data-name='{name}'] [data-action=copy]").click()
    page.wait_for_selector("#model-list tr[data-name^=tiny-copy]")
    page.fill("#create-name", "tiny-made")
    page.fill("#create-modelfile", f'FROM {name}\nPARAMETER temperature 0.2\nSYSTEM """Be brief."""')
    page.click("#create-form button[type=submit]")
    page.wait_for_selector("#model-list tr[data-name^=tiny-made]")
    assert page.locator("#create-status").inner_text() == "success"
    made = api(page, "POST", "/api/show", json={"model": "tiny-made"})
    assert made["system"] == "Be brief." and "temperature" in made["parameters"]
    page.wait_for_function("() => /[1-9]/.test(document.querySelector('#live-tps').textContent)", timeout=20_000)
    page.evaluate("() => { document.querySelector('#model-details').hidden = true; }")
    page.evaluate("() => { document.querySelector('#view-admin').scrollTop = 0; }")
    page.screenshot(path=str(screenshots / "admin.png"))
    page.on("dialog", lambda dialog: dialog.accept())
    for doomed in (name, "tiny-copy:latest", "tiny-made:latest"):
        page.locator(f"#model-list tr[data-name='{doomed}'] [data-action=delete]").click()
        page.wait_for_selector(f"#model-list tr[data-name='{doomed}']", state="detached")
    assert not any("tiny" in row["name"] for row in api(page, "GET", "/api/tags")["models"])

    page.locator("#ps-list tr[data-name^=smollm2] [data-action=unload]").click()
    page.wait_for_selector("#ps-list tr[data-name]", state="detached")
    assert api(page, "GET", "/api/ps")["models"] == []


def test_narrow_screen_and_dark_theme(browser, web_server, screenshots):
    context = browser.new_context(viewport={"width": 390, "height": 760}, is_mobile=True, has_touch=True)
    tab = context.new_page()
    tab.base = web_server
    open_page(tab)
    conversation = api(tab, "GET", "/api/conversations?limit=1")["conversations"][0]["id"]
    open_page(tab, f"/#/c/{conversation}")
    tab.wait_for_selector(".msg")
    assert tab.locator("#sidebar").is_hidden() and tab.locator("#panel").is_hidden()
    width = tab.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the screen
    tab.click("#toggle-theme")
    assert tab.evaluate("() => document.documentElement.dataset.theme") == "dark"
    tab.screenshot(path=str(screenshots / "narrow-dark.png"))
    tab.click("#toggle-sidebar")
    assert tab.locator("#sidebar").is_visible()
    tab.screenshot(path=str(screenshots / "narrow-sidebar.png"))
    context.close()
