"""Model output is untrusted: Markdown with HTML in it runs nothing (DOMPurify, and the page's CSP). The page asks
for an API key when the server has EMBER_API_KEYS and keeps it in the browser."""

from __future__ import annotations

import httpx

from tests.server import serve_process
from tests.web.conftest import api, open_page

ATTACK = """Here is some **bold** text and code:

```python
print("hi")
```

<img src=x onerror="window.__pwned = 'img'">
<script>window.__pwned = 'script'</script>
<a href="javascript:window.__pwned='link'">click me</a>
<iframe src="javascript:window.__pwned='frame'"></iframe>
<svg><script>window.__pwned = 'svg'</script></svg>
<div style="position:fixed;inset:0" onclick="window.__pwned='div'">overlay</div>
[x](javascript:window.__pwned='md')
"""


def test_html_in_model_output_runs_nothing(page, screenshots):
    messages = [{"role": "user", "content": "Show me HTML"}, {"role": "assistant", "content": ATTACK}]
    target = api(page, "POST", "/api/conversations", json={"title": "Injection", "messages": messages})
    conversation = target["conversation"]["id"]
    response = httpx.get(page.base + "/", headers={"Accept": "text/html"})
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy

    open_page(page, f"/#/c/{conversation}")
    body = page.locator(".msg.assistant .msg-body")
    body.wait_for()
    assert body.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert body.locator("pre code.hljs").count() == 1 and body.locator("pre .copy").count() == 1
    for link in body.locator("a").all():
        link.click()
    body.locator("text=overlay").click()
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__pwned") is None
    found = body.evaluate(
        """body => [...body.querySelectorAll('*')].flatMap(node => [
            ...(['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'STYLE'].includes(node.tagName) ? [node.tagName] : []),
            ...[...node.attributes]
                .filter(a => a.name.startsWith('on') || a.name === 'style' || /^\\s*javascript:/i.test(a.value))
                .map(a => `${node.tagName} ${a.name}=${a.value}`),
        ])"""
    )
    assert found == []
    page.screenshot(path=str(screenshots / "injection.png"))


def test_the_page_asks_for_the_api_key_and_keeps_it(browser, tmp_path):
    env = {"EMBER_HOME": str(tmp_path / "home"), "EMBER_API_KEYS": "sesame"}
    with serve_process(env) as (_, base, _):
        assert httpx.get(base + "/api/tags").status_code == 401
        assert httpx.get(base + "/", headers={"Accept": "text/html"}).status_code == 200  # the page itself is open
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(base + "/")
        tab.wait_for_selector("#key-dialog[open]")
        tab.fill("#key-input", "sesame")
        tab.click("#key-form button")
        tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert "smollm2:latest" in tab.locator("#model").inner_text()
        tab.reload()  # kept in this browser: no second question
        tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert not tab.locator("#key-dialog").evaluate("dialog => dialog.open")
        context.close()
