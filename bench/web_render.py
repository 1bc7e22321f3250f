"""The page with a long conversation: time to open (fetch, render, paint) and to scroll a 1,000-message
conversation in chromium, and how many message elements the page keeps (it renders only what is in view).

A server runs in this process on a temporary EMBER_HOME (no model is loaded: the conversation is imported);
Debian's chromium is driven by Playwright, as in tests/web.

    .venv/bin/python bench/web_render.py [--messages 1000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
ANSWER = """Here is a way to do it, step {n}:

1. Read the input and **check** it.
2. Keep a `dict` of what you have seen.

```python
def step_{n}(items):
    seen = {{}}
    for item in items:
        seen[item] = seen.get(item, 0) + 1
    return seen
```

| case | result |
|------|--------|
| empty | `{{}}` |
| one | `{{x: 1}}` |
"""


def conversation_document(count: int) -> dict[str, Any]:
    messages = []
    for n in range(count):
        parent = f"m{n - 1}" if n else None
        if n % 2 == 0:
            content = f"Question {n}: how would you count the items of a list, and why that way?"
            role = "user"
        else:
            content, role = ANSWER.format(n=n), "assistant"
        messages.append({"id": f"m{n}", "parent_id": parent, "role": role, "content": content})
    return {
        "format": "ember.conversation",
        "version": 1,
        "conversation": {"title": f"{count} messages", "model": "smollm2", "active_leaf": f"m{count - 1}"},
        "messages": messages,
    }


MEASURE_OPEN = """async (id) => {
    const frame = () => new Promise(requestAnimationFrame);
    const started = performance.now();
    await window.ember.chat.open(id);
    await frame(); await frame();
    return performance.now() - started;
}"""

MEASURE_SCROLL = """async (steps) => {
    const box = document.querySelector('#messages');
    const frame = () => new Promise(requestAnimationFrame);
    const times = [];
    box.scrollTop = box.scrollHeight;
    await frame(); await frame();
    const step = box.clientHeight * 0.8;
    let last = performance.now();
    for (let i = 0; i < steps; i++) {
        box.scrollTop = Math.max(0, box.scrollTop - step);
        await frame();
        const now = performance.now();
        times.push(now - last);
        last = now;
    }
    const again = [];  // back down: every message has been rendered once, so this is layout and paint only
    last = performance.now();
    for (let i = 0; i < steps; i++) {
        box.scrollTop = box.scrollTop + step;
        await frame();
        const now = performance.now();
        again.push(now - last);
        last = now;
    }
    return {times, again, top: box.scrollTop, elements: document.querySelectorAll('#messages .msg').length};
}"""


def run(messages: int, runs: int) -> dict[str, Any]:
    from tests.server import running_server

    with tempfile.TemporaryDirectory() as home:
        os.environ["EMBER_HOME"] = home
        with running_server() as base, sync_playwright() as playwright:
            imported = httpx.post(base + "/api/conversations/import", json=conversation_document(messages), timeout=60)
            imported.raise_for_status()
            conversation = imported.json()["conversation"]["id"]
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
            opens, frames, again, elements = [], [], [], 0
            for _ in range(runs):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(base + "/")
                page.wait_for_selector("body[data-ready=true]")
                opens.append(page.evaluate(MEASURE_OPEN, conversation))
                result = page.evaluate(MEASURE_SCROLL, 120)
                frames.extend(result["times"])
                again.extend(result["again"])
                elements = max(elements, result["elements"])
                page.close()
            browser.close()
    frames.sort()
    again.sort()
    return {
        "messages": messages,
        "runs": runs,
        "open_ms_median": statistics.median(opens),
        "open_ms": opens,
        "scroll_frame_ms_median": statistics.median(frames),
        "scroll_frame_ms_p95": frames[int(0.95 * (len(frames) - 1))],
        "scroll_frame_ms_max": frames[-1],
        "rendered_scroll_frame_ms_median": statistics.median(again),
        "rendered_scroll_frame_ms_p95": again[int(0.95 * (len(again) - 1))],
        "message_elements_max": elements,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    figures = run(options.messages, options.runs)
    if options.json:
        print(json.dumps(figures))
        return
    print(f"{figures['messages']} messages, {figures['runs']} runs")
    print(f"open (fetch + render + paint): median {figures['open_ms_median']:.0f} ms")
    print(
        f"scroll, per step of 0.8 screens: median {figures['scroll_frame_ms_median']:.1f} ms, "
        f"p95 {figures['scroll_frame_ms_p95']:.1f} ms, max {figures['scroll_frame_ms_max']:.1f} ms"
    )
    print(
        f"scroll back over rendered messages: median {figures['rendered_scroll_frame_ms_median']:.1f} ms, "
        f"p95 {figures['rendered_scroll_frame_ms_p95']:.1f} ms"
    )
    print(f"message elements in the page at most: {figures['message_elements_max']} of {figures['messages']}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.server, when run as a script
    main()
