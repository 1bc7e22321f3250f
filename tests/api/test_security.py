"""Safe by default: API keys on every route, the Host allow-list, CORS, size limits, clean errors."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from ember.api.app import create_app
from ember.config import Settings
from tests.server import running_server

KEY = "secret-key-1"
LOCAL = {"Host": "127.0.0.1:11434"}  # TestClient's websockets say "testserver", which the Host check refuses


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    app = create_app(Settings(api_keys=f"{KEY}, other-key"))
    with TestClient(app, base_url="http://127.0.0.1:11434") as client:
        yield client


def _flatten(routes: list) -> Iterator:
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _flatten(included.routes)
        else:
            yield route


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """Every route of the app, as it is now: a route added later is covered without editing this test."""
    found = []
    for route in _flatten(client.app.routes):  # type: ignore[attr-defined]
        path = re.sub(r"\{[^}]+\}", "sha256:" + "0" * 64, route.path)
        if isinstance(route, APIWebSocketRoute | WebSocketRoute):
            found.append(("WEBSOCKET", path))
        elif isinstance(route, APIRoute | Route):
            found.extend((method, path) for method in sorted(route.methods or ()))
    assert len(found) > 10
    return found


def test_every_route_but_health_needs_a_key(keyed: TestClient) -> None:
    for method, path in _routes(keyed):
        if method == "WEBSOCKET":
            with pytest.raises(WebSocketDisconnect) as closed, keyed.websocket_connect(path, headers=LOCAL) as socket:
                socket.receive_json()
            assert closed.value.code == 1008, path
            with keyed.websocket_connect(path, headers={**LOCAL, "Authorization": f"Bearer {KEY}"}) as socket:
                socket.send_json({"type": "cancel"})  # accepted with the key: nothing to cancel, no answer
            continue
        response = keyed.request(method, path, json={})
        if path == "/health":
            assert response.status_code == 200
            continue
        if path == "/" or path.startswith("/web/"):  # the built-in page: it holds no data and asks for the key
            assert response.status_code in (200, 404), (method, path, response.status_code)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        if method != "HEAD":
            assert "API key" in response.text
        wrong = keyed.request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401, (method, path)


def test_a_valid_key_is_accepted(keyed: TestClient) -> None:
    for key in (KEY, "other-key"):
        response = keyed.get("/api/version", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200 and response.json()["version"]
    openai_style = keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert openai_style.status_code == 200
    refused = keyed.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def open_client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings()), base_url="http://127.0.0.1:11434") as client:
        yield client


def test_dns_rebinding_is_refused_on_loopback(open_client: TestClient) -> None:
    # Ollama's allow rule: localhost names, *.localhost, *.local, *.internal, loopback and private addresses
    for host in (
        "localhost:11434",
        "127.0.0.1:11434",
        "[::1]:11434",
        "host.docker.internal:11434",
        "ember.localhost",
        "printer.local",
        "192.168.1.20:11434",
        "10.0.0.7",
    ):
        assert open_client.get("/api/version", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example:11434", "evil.example", "8.8.8.8", "localhost.attacker.example"):
        rebound = open_client.get("/api/version", headers={"Host": host})
        assert rebound.status_code == 403 and "EMBER_ALLOWED_HOSTS" in rebound.json()["error"], host
    anthropic_shape = open_client.post("/v1/messages", headers={"Host": "evil.example"}, json={})
    assert anthropic_shape.json()["error"]["type"] == "permission_error"


def test_a_real_server_on_loopback_refuses_a_foreign_host() -> None:
    with running_server() as base:
        assert httpx.get(base + "/api/version", headers={"Host": "evil.example"}).status_code == 403
        allowed = httpx.get(base + "/api/version", headers={"Host": "host.docker.internal:11434"})
        assert allowed.status_code == 200
    with running_server(allowed_hosts="ember.example.org") as base:
        assert httpx.get(base + "/api/version", headers={"Host": "ember.example.org"}).status_code == 200


def test_bound_to_all_addresses_there_is_no_host_check_but_keys_still_apply() -> None:
    """Open WebUI's Docker recipe: the server bound to 0.0.0.0, called as host.docker.internal."""
    with running_server(bind="0.0.0.0") as base:
        for host in ("host.docker.internal:11434", "evil.example"):
            response = httpx.get(base + "/api/tags", headers={"Host": host})
            assert response.status_code == 200 and "models" in response.json(), host
    with running_server(bind="0.0.0.0", api_keys=KEY) as base:
        headers = {"Host": "host.docker.internal:11434"}
        assert httpx.get(base + "/api/tags", headers=headers).status_code == 401
        keyed = httpx.get(base + "/api/tags", headers={**headers, "Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200


def test_cors_allows_local_origins_only(open_client: TestClient) -> None:
    local = open_client.options(
        "/api/chat", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    )
    assert local.headers.get("access-control-allow-origin") == "http://localhost:3000"
    foreign = open_client.options(
        "/api/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in foreign.headers


def test_oversized_and_malformed_bodies_get_clear_errors(open_client: TestClient) -> None:
    too_big = open_client.post("/api/generate", content=b"x" * (33 * 1024 * 1024))
    assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]
    bad_json = open_client.post("/api/generate", content=b"{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    not_object = open_client.post("/api/chat", json=[1, 2])
    assert not_object.status_code == 400
    bad_field = open_client.post("/api/generate", json={"model": "smollm2", "prompt": "x", "think": "extreme"})
    assert bad_field.status_code == 400 and "think" in bad_field.json()["error"]  # unknown fields are ignored
    bad_option = open_client.post(
        "/api/generate", json={"model": "smollm2", "prompt": "x", "options": {"temperature": -2}}
    )
    assert bad_option.status_code == 400 and "temperature" in bad_option.json()["error"]
    capped = open_client.post(
        "/api/generate", json={"model": "smollm2", "prompt": "x", "options": {"num_predict": 10**9}}
    )
    assert capped.status_code == 400 and "limit" in capped.json()["error"]
    missing = open_client.post("/api/generate", json={"model": "no-such-model", "prompt": "x"})
    assert missing.status_code == 404
    openai_missing = open_client.post(
        "/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    )
    assert openai_missing.status_code == 404 and openai_missing.json()["error"]["message"]
    for route, body in (
        ("/api/generate", {"model": "~nosuchuser/x.gguf", "prompt": "x"}),
        ("/api/detokenize", {"model": "~nosuchuser/x", "tokens": [1]}),
    ):
        unknown_home = open_client.post(route, json=body)  # found by schemathesis: once a 500
        assert unknown_home.status_code == 404 and "home folder" in unknown_home.json()["error"]
    no_route = open_client.get("/api/nothing-here")
    assert no_route.status_code == 404 and "error" in no_route.json()
    for response in (too_big, bad_json, bad_field, missing, no_route):
        assert "Traceback" not in response.text


def test_the_page_is_open_but_what_it_calls_needs_the_key(keyed: TestClient) -> None:
    page = keyed.get("/", headers={**LOCAL, "Accept": "text/html"})
    assert page.status_code == 200 and '<script type="module"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert keyed.get("/web/js/main.js", headers=LOCAL).status_code == 200
    assert keyed.get("/web/../api/tags", headers=LOCAL).status_code in (401, 404)
    assert keyed.get("/api/conversations", headers=LOCAL).status_code == 401
