"""Conversations from the server's store in the page: search (Ctrl+K), rename, export, import, delete, new chat;
the context meter and its warning; the strategy and presets of the side panel."""

from __future__ import annotations

import json

from tests.web.conftest import api, current_conversation, open_page, send, set_options


def make_conversation(tab, title: str, messages: list[dict], **fields) -> str:
    body = {"title": title, "messages": messages, **fields}
    return api(tab, "POST", "/api/conversations", json=body)["conversation"]["id"]


def test_search_rename_export_import_and_delete(page, tmp_path):
    words = [{"role": "user", "content": "How do lighthouses work?"}, {"role": "assistant", "content": "A lamp."}]
    target = make_conversation(page, "Lighthouses", words)
    make_conversation(page, "Other", [{"role": "user", "content": "Something else"}])
    open_page(page)
    page.keyboard.press("Control+K")
    assert page.evaluate("() => document.activeElement.id") == "search"
    page.keyboard.type("lighthouses")
    page.wait_for_function("() => document.querySelectorAll('li.conversation').length === 1")
    assert page.locator("li.conversation").get_attribute("data-id") == target

    page.click(f"li.conversation[data-id={target}] .open")
    page.wait_for_selector(".msg.assistant")
    page.click(f"li.conversation[data-id={target}] [data-action=rename]")
    page.fill("li.conversation input.rename", "Lights at sea")
    page.press("li.conversation input.rename", "Enter")
    page.wait_for_function("() => document.querySelector('li.conversation .title')?.textContent === 'Lights at sea'")
    assert api(page, "GET", f"/api/conversations/{target}")["conversation"]["title"] == "Lights at sea"

    with page.expect_download() as download:
        page.click(f"li.conversation[data-id={target}] [data-action=export]")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    document = json.loads(exported.read_text())
    assert [m["content"] for m in document["messages"]] == ["How do lighthouses work?", "A lamp."]

    page.set_input_files("#import-file", str(exported))
    page.wait_for_function(f"() => window.ember.chat.conversation && window.ember.chat.conversation.id !== '{target}'")
    imported = current_conversation(page)
    assert [m["content"] for m in api(page, "GET", f"/api/conversations/{imported}")["messages"]] == [
        "How do lighthouses work?",
        "A lamp.",
    ]

    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#search", "")
    page.wait_for_selector(f"li.conversation[data-id={target}]")
    page.hover(f"li.conversation[data-id={target}]")  # its buttons show on hover, as a user finds them
    page.click(f"li.conversation[data-id={target}] [data-action=delete]")
    page.wait_for_selector(f"li.conversation[data-id={target}]", state="detached")
    assert target not in {row["id"] for row in api(page, "GET", "/api/conversations?limit=1000")["conversations"]}

    page.click("#new-chat")
    assert page.evaluate("() => window.ember.chat.conversation") is None
    assert page.locator(".msg").count() == 0


def test_meter_warns_before_the_context_fills_and_the_strategy_is_kept(page):
    long_history = []
    for turn in range(9):  # about 84% of num_ctx: warned, nothing dropped yet
        long_history += [
            {"role": "user", "content": f"Question {turn}: " + "tell me about rivers and mountains " * 6},
            {"role": "assistant", "content": f"Answer {turn}: " + "rivers flow down from the mountains " * 6},
        ]
    target = make_conversation(page, "Long", long_history, options={"num_ctx": 1024, "num_predict": 6})
    open_page(page, f"/#/c/{target}")
    page.wait_for_selector("#meter:not([hidden])")
    page.wait_for_function("() => document.querySelector('#meter').classList.contains('warn')")
    text = page.locator("#meter .meter-text").inner_text()
    assert "/ 1024 tokens" in text and "full" in text and "oldest turns will be dropped" in text

    page.select_option("#strategy", "summarize")
    page.wait_for_function("() => document.querySelector('#meter .meter-text').textContent.includes('summarize')")
    assert api(page, "GET", f"/api/conversations/{target}")["conversation"]["strategy"] == "summarize"


def test_presets_are_stored_on_the_server_and_set_the_system_prompt(page):
    open_page(page)
    page.fill("#system", "You are a pirate. Answer like one.")
    page.fill("[data-option=temperature]", "0.3")
    page.once("dialog", lambda dialog: dialog.accept("Pirate"))
    page.click("#preset-save")
    page.wait_for_selector("#preset option[value=Pirate]", state="attached")
    preset = next(p for p in api(page, "GET", "/api/presets")["presets"] if p["name"] == "Pirate")
    assert preset["system"] == "You are a pirate. Answer like one." and preset["options"]["temperature"] == 0.3

    open_page(page)  # a fresh page: pick the preset, and a new chat uses it
    page.select_option("#preset", "Pirate")
    assert page.input_value("#system") == "You are a pirate. Answer like one."
    set_options(page, temperature="0.3")
    send(page, "Who are you?")
    conversation = api(page, "GET", f"/api/conversations/{current_conversation(page)}")["conversation"]
    assert conversation["system"] == "You are a pirate. Answer like one."
    assert conversation["options"]["temperature"] == 0.3
