"""The chat in a real browser: send and stream, stop, regenerate and branches, edit, continue, pins, reload."""

from __future__ import annotations

from tests.web.conftest import api, current_conversation, open_page, send, set_options, wait_answered


def test_send_streams_the_answer_and_a_reload_finds_the_conversation(page, screenshots):
    open_page(page)
    set_options(page)
    page.click("#input")
    page.keyboard.type("Write a haiku")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    assert page.input_value("#input") == "Write a haiku\n" and page.locator(".msg").count() == 0
    page.fill("#input", "Write a haiku about the sea.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.live", timeout=30_000)  # the answer streams into a live message first
    page.wait_for_function(
        "() => document.querySelector('.msg.live .msg-body')?.textContent.trim().length > 1", timeout=60_000
    )
    wait_answered(page, 1)
    answer = page.locator(".msg.assistant").last
    stats = answer.locator(".msg-stats").inner_text()
    assert "tokens/s" in stats and "first token" in stats and "smollm2" in stats
    assert page.locator("#meter .meter-text").inner_text().split(" / ")[1].startswith("1024 tokens")
    conversation = current_conversation(page)
    stored = api(page, "GET", f"/api/conversations/{conversation}")["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"].strip() and stored[1]["content"].strip()[:10] in answer.inner_text()
    page.screenshot(path=str(screenshots / "chat.png"))

    page.reload()  # the address keeps the conversation open
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .msg-body").inner_text() == "Write a haiku about the sea."
    open_page(page, "/")  # a fresh page lists it; a click opens it
    page.click(f"li.conversation[data-id={conversation}] .open")
    page.wait_for_selector(".msg.assistant")
    assert current_conversation(page) == conversation


def test_stop_cancels_the_answer_and_keeps_what_was_written(page):
    open_page(page)
    set_options(page, num_predict="400", temperature="0.8")
    page.fill("#input", "Tell me a very long story about a dragon and a knight.")
    page.click("#send")  # the button sends too
    page.wait_for_function(
        "() => document.querySelector('.msg.live .msg-body')?.textContent.trim().length > 3", timeout=60_000
    )
    page.keyboard.press("Escape")
    wait_answered(page)
    stored = api(page, "GET", f"/api/conversations/{current_conversation(page)}")["messages"][-1]
    assert stored["status"] == "incomplete" and stored["info"]["done_reason"] == "cancelled"
    assert stored["content"]
    # The page reads the conversation again until the server has written the stopped answer.
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .badge')?.textContent === 'stopped'", timeout=15_000
    )
    # The server cancelled the sequence: no slot stays busy.
    ps = api(page, "GET", "/api/ps")["models"]
    assert all(model["ember"]["slots_in_use"] == 0 for model in ps)


def test_regenerate_edit_continue_and_branches(page):
    open_page(page)
    set_options(page, temperature="0.9", seed="1")
    send(page, "Name a fruit.")
    first = page.locator(".msg.assistant .msg-body").last.inner_text()

    page.fill("[data-option=seed]", "2")  # another seed: another answer
    page.wait_for_timeout(600)  # the panel saves its options to the conversation
    page.locator(".msg.assistant [data-action=regenerate]").last.click()
    wait_answered(page)
    page.wait_for_selector(".msg.assistant .branch-index")
    assert page.locator(".msg.assistant .branch-index").inner_text() == "2/2"

    page.click(".msg.assistant [data-action=branch-prev]")
    page.wait_for_function("() => document.querySelector('.msg.assistant .branch-index')?.textContent === '1/2'")
    assert page.locator(".msg.assistant .msg-body").last.inner_text() == first
    conversation = current_conversation(page)
    tree = api(page, "GET", f"/api/conversations/{conversation}?view=tree")
    assert len([m for m in tree["messages"] if m["role"] == "assistant"]) == 2

    page.locator(".msg.user [data-action=edit]").click()
    page.fill(".edit-box", "Name a vegetable.")
    page.press(".edit-box", "Enter")
    wait_answered(page)
    page.wait_for_function("() => document.querySelector('.msg.user .branch-index')?.textContent === '2/2'")
    assert page.locator(".msg.user .msg-body").inner_text() == "Name a vegetable."
    path = api(page, "GET", f"/api/conversations/{conversation}")["messages"]
    assert path[0]["content"] == "Name a vegetable." and path[1]["role"] == "assistant"

    before = path[1]["content"]
    page.locator(".msg.assistant [data-action=continue]").click()
    wait_answered(page)
    after = api(page, "GET", f"/api/conversations/{conversation}")["messages"]
    assert len(after) == 2 and after[1]["id"] == path[1]["id"]  # written into the same answer
    assert after[1]["content"].startswith(before) and len(after[1]["content"]) > len(before)

    page.locator(".msg.assistant [data-action=pin]").click()
    page.wait_for_selector(".msg.assistant.pinned")
    assert api(page, "GET", f"/api/conversations/{conversation}")["messages"][1]["pinned"] is True


def test_a_long_prompt_shows_its_prefill_progress(page, screenshots):
    open_page(page)
    set_options(page, num_predict="1", num_ctx="4096")
    # About 2,000 tokens: several 512-token chunks, so the label stays up for a while even on a fast machine.
    long_message = "Summarize these words. " + " ".join(f"word{n}" for n in range(500))
    page.fill("#input", long_message)
    page.press("#input", "Enter")
    # The first label drawn, read in the page as soon as it appears (the bar goes when the answer starts).
    label = page.wait_for_function(
        """() => {
            const span = document.querySelector('.msg.live .prefill span');
            return span && span.textContent.startsWith('reading the prompt: ') ? span.textContent : null;
        }""",
        timeout=60_000,
    ).json_value()
    assert label.startswith("reading the prompt: ") and label.endswith(" tokens")
    numbers = label.removeprefix("reading the prompt: ").removesuffix(" tokens")
    done, total = (int(part) for part in numbers.split(" / "))
    assert 0 < done < total
    page.screenshot(path=str(screenshots / "prefill.png"))
    wait_answered(page, 1)
