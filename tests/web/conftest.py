"""The page in a real browser: Debian's chromium driven by Playwright, against `ember serve` with the real
default model. One server and one browser for the whole session; each test gets a fresh browser context.

Screenshots of the main views go to $EMBER_WEB_SCREENSHOTS when it is set, else to `screenshots/` under
pytest's base temporary directory (printed at the end of the run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.server import serve_process

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHORT = {"temperature": "0", "num_predict": "6", "num_ctx": "1024"}  # panel options that keep answers quick


@pytest.fixture(scope="session")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ember serve` with a home of its own, as a new user has it (the bundled model is listed)."""
    home = tmp_path_factory.mktemp("web-home")
    env = {"EMBER_HOME": str(home), "EMBER_KEEP_ALIVE": "30m", "EMBER_NUM_PARALLEL": "2"}
    with serve_process(env) as (_, base, _):
        yield base


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup (it installs Debian's chromium)")
    with sync_playwright() as playwright:
        # Playwright starts chromium with a fresh temporary profile (--user-data-dir) of its own, so nothing of
        # another run, or of the user's own chromium, is read.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("EMBER_WEB_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class PageErrors(list):
    """Uncaught errors in the page's scripts: any is a failed test."""


@pytest.fixture
def page(browser: object, web_server: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    tab = context.new_page()
    errors = PageErrors()
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.errors = errors
    tab.base = web_server
    yield tab
    context.close()
    assert not errors, f"errors in the page: {errors}"


def open_page(tab: object, path: str = "/") -> object:
    tab.goto(tab.base + path)
    tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return tab


def set_options(tab: object, **values: str) -> None:
    for name, value in {**SHORT, **values}.items():
        tab.fill(f"[data-option={name}]", value)


def send(tab: object, text: str) -> None:
    """Type a message and press Enter; wait until its answer is stored and shown."""
    answers = tab.locator(".msg.assistant:not(.live)").count()
    tab.fill("#input", text)
    tab.press("#input", "Enter")
    wait_answered(tab, answers + 1)


def wait_answered(tab: object, count: int | None = None) -> None:
    tab.wait_for_selector("#stop", state="hidden", timeout=120_000)
    tab.wait_for_selector(".msg.live", state="detached", timeout=30_000)
    if count is not None:
        tab.wait_for_function(
            "n => document.querySelectorAll('.msg.assistant:not(.live)').length >= n", arg=count, timeout=30_000
        )


def api(tab: object, method: str, path: str, **kwargs: object) -> dict:
    response = httpx.request(method, tab.base + path, timeout=60, **kwargs)
    response.raise_for_status()
    return response.json()


def current_conversation(tab: object) -> str:
    return tab.evaluate("() => window.ember.chat.conversation.id")
