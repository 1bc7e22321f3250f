"""`ember serve`, and the commands that ask a running server: `ember ps`, `ember stop`."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from ember.config import Settings
from ember.errors import EmberError, ModelNotFoundError


def settings_help() -> str:
    """Every EMBER_* setting with its default and meaning, for `ember serve --help`."""
    lines = ["Settings (environment variables; the flags above override them):", ""]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else "(per platform)"
        lines.append(f"EMBER_{name.upper()}={default if default not in (None, '') else ''}  {field.description}")
    return "\n\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=settings_help())(serve)
    app.command("ps")(ps)
    app.command("stop")(stop)


class ServerUnreachableError(EmberError):
    http_status = 503


def server_request(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A JSON request to the ember server at EMBER_HOST; a clear error when none is running."""
    import httpx

    settings = Settings()
    headers = {}
    keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    try:
        response = httpx.request(method, settings.base_url + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError:
        raise ServerUnreachableError(
            f"could not reach an ember server at {settings.base_url}; start one with `ember serve`"
        ) from None
    try:
        data = response.json()
    except ValueError:
        data = {"error": response.text}
    if response.status_code >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        message = message.get("message") if isinstance(message, dict) else message
        error = ModelNotFoundError if response.status_code == 404 else EmberError
        raise error(str(message or f"the server answered {response.status_code}"))
    return data


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on, host:port (EMBER_HOST).")] = None,
    num_parallel: Annotated[
        int | None, typer.Option("--parallel", "-np", help="Sequences each model decodes at once.")
    ] = None,
    max_loaded: Annotated[int | None, typer.Option("--max-loaded-models", help="Most models loaded at once.")] = None,
    keep_alive: Annotated[str | None, typer.Option("--keep-alive", help="Default keep_alive, e.g. 5m or -1.")] = None,
) -> None:
    """Serve the Ollama API, the OpenAI API and ember's own routes (127.0.0.1:11434 unless EMBER_HOST says)."""
    from ember.api.app import create_app
    from ember.api.shutdown import serve_app

    overrides = {
        key: value
        for key, value in {
            "host": host,
            "num_parallel": num_parallel,
            "max_loaded_models": max_loaded,
            "keep_alive": keep_alive,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    bind_host, port = settings.host_and_port
    print(f"ember serving on http://{bind_host}:{port}", file=sys.stderr)
    serve_app(create_app(settings), bind_host, port, settings.shutdown_grace)


def _until(expires_at: str) -> str:
    if expires_at.startswith("0001"):
        return "Forever"
    try:
        moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return expires_at
    seconds = int(moment - time.time())
    if seconds <= 0:
        return "Stopping..."
    if seconds < 60:
        return f"{seconds} seconds from now"
    return f"{seconds // 60} minutes from now" if seconds < 3600 else f"{seconds // 3600} hours from now"


def ps() -> None:
    """List the models the server has loaded: size, CPU/GPU split (or an upstream model's replicas and their
    health), slots in use, when each unloads."""
    from ember.cli.models import format_size

    models = server_request("GET", "/api/ps").get("models", [])
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "SLOTS", "UNTIL")]
    for model in models:
        size, vram = model.get("size", 0), model.get("size_vram", 0)
        if vram <= 0:
            processor = "100% CPU"
        elif vram >= size:
            processor = "100% GPU"
        else:
            processor = f"{round(100 * (size - vram) / size)}%/{round(100 * vram / size)}% CPU/GPU"
        extra = model.get("ember", {})
        replicas = extra.get("replicas")
        if replicas is not None:
            processor = f"upstream {sum(1 for r in replicas if r.get('healthy'))}/{len(replicas)} up"
        slots = f"{extra.get('slots_in_use', 0)}/{extra.get('slots', 0)}"
        rows.append(
            (
                model["name"],
                model.get("digest", "")[:12],
                format_size(size),
                processor,
                str(model.get("context_length", "")),
                slots,
                _until(model.get("expires_at", "")),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("    ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
    for model in models:
        for replica in model.get("ember", {}).get("replicas") or []:
            health = "up" if replica.get("healthy") else f"down ({replica.get('error') or 'not answering'})"
            print(f"{model['name']}  {replica.get('url')}  {health}, {replica.get('outstanding', 0)} in flight")


def stop(name: Annotated[str, typer.Argument(help="The model to unload.")]) -> None:
    """Unload a model from the server now."""
    server_request("POST", "/api/stop", {"model": name})
