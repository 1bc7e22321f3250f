"""Model management commands: pull, list, show, create, cp, rm."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.cli import remote
from ember.errors import InvalidRequestError
from ember.store.gguf_file import GGUFInfo, read_gguf
from ember.store.pull import format_parameter_count
from ember.store.resolve import TRANSFORMERS, ModelSource, looks_like_path, resolve_model
from ember.store.store import ModelStore


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("list")(list_models)
    app.command("ls", hidden=True)(list_models)
    app.command("show")(show)
    app.command("create")(create)
    app.command("cp")(copy)
    app.command("rm")(remove)


def _progress(description: str, digest: str | None = None) -> Any:
    from ember.store.download import rich_progress

    return rich_progress(description)


def _notice(text: str) -> None:
    print(text, file=sys.stderr)


def pull(
    source: Annotated[
        str,
        typer.Argument(
            help="An Ollama library name (llama3.2:1b, user/model:tag), a .gguf path, an http(s) URL, "
            "hf.co/OWNER/REPO[:QUANT], or smollm2."
        ),
    ],
    name: Annotated[str | None, typer.Option("--name", help="Name to register the model under.")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Refuse the file unless it has this digest.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow http:// for a name with a registry host (host/ns/model:tag).")
    ] = False,
) -> None:
    """Add a model to the store (downloads resume after an interruption)."""
    from ember.store.pull import pull as pull_model

    if remote.available():
        pulled, digest, size = remote.pull(
            source, name=name, sha256=sha256, insecure=insecure, progress=_progress, notice=_notice
        )
    else:
        result = pull_model(source, name=name, sha256=sha256, insecure=insecure, progress=_progress, status=_notice)
        pulled, digest, size = result.name, result.digest, result.manifest.size
    print(f"pulled {pulled} ({digest[7:19]}, {format_size(size)})", file=sys.stderr)


def format_size(size: int) -> str:
    """Bytes as Ollama shows them: 98 MB, 4.7 GB (decimal units)."""
    for limit, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if size >= limit:
            value = size / limit
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


def format_age(timestamp: float, now: float | None = None) -> str:
    seconds = max(0, int((now or time.time()) - timestamp))
    for size, unit in (
        (86400 * 365, "year"),
        (86400 * 30, "month"),
        (86400 * 7, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


def list_models() -> None:
    """List the models in the store."""
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    if remote.available():
        models = remote.list_rows()
    else:
        models = [(str(m.name), m.model_layer.digest[7:], m.size, m.modified) for m in ModelStore().list()]
    for name, digest, size, modified in models:
        rows.append((name, digest[:12], format_size(size), format_age(modified)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("    ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


def model_facts(source: ModelSource, info: GGUFInfo) -> dict[str, Any]:
    """What `show` reports: facts read from the file, and the defaults that come with the model."""
    return {
        "name": source.name,
        "architecture": info.architecture,
        "parameters": info.parameter_count,
        "parameter_size": format_parameter_count(info.parameter_count),
        "quantization": info.file_type,
        "context_length": info.arch_value("context_length"),
        "embedding_length": info.arch_value("embedding_length"),
        "layers": info.arch_value("block_count"),
        "digest": source.digest,
        "template": source.template or info.chat_template,
        "system": source.system,
        "parameters_defaults": dict(source.parameters),
        "messages": [dict(message) for message in source.messages],
        "adapters": [str(path) for path in source.adapters],
        "license": source.license or info.metadata.get("general.license"),
        "engine": source.engine,
    }


def directory_facts(source: ModelSource) -> dict[str, Any]:
    """What `show` reports of a transformers model directory."""
    from ember.store.model_directory import read_model_directory

    directory = read_model_directory(source.path)
    return {
        "name": source.name,
        "architecture": directory.architecture,
        "parameters": directory.parameter_count,
        "parameter_size": format_parameter_count(directory.parameter_count),
        "quantization": directory.stored_dtype,
        "context_length": directory.context_length,
        "embedding_length": directory.config.get("hidden_size"),
        "layers": directory.config.get("num_hidden_layers"),
        "digest": source.digest,
        "template": source.template or directory.chat_template,
        "system": source.system,
        "parameters_defaults": dict(source.parameters),
        "messages": [dict(message) for message in source.messages],
        "adapters": [],
        "license": source.license,
        "engine": source.engine,
    }


def show(
    name: Annotated[str, typer.Argument(help="Model name or .gguf path.")],
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Print a Modelfile that recreates it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False,
    system: Annotated[bool, typer.Option("--system", help="Print only the system prompt.")] = False,
    parameters: Annotated[bool, typer.Option("--parameters", help="Print only the parameters.")] = False,
    license_: Annotated[bool, typer.Option("--license", help="Print only the license.")] = False,
) -> None:
    """Show a model's architecture, size, quantization, template, system prompt, parameters and license."""
    if not looks_like_path(name) and remote.available():
        facts, modelfile_text = remote.show(name)
    else:
        facts, modelfile_text = _local_facts(name)
    if as_json:
        print(json.dumps(facts, indent=2, default=str))
    elif modelfile:
        print(modelfile_text)
    elif template:
        print(facts["template"] or "")
    elif system:
        print(facts["system"] or "")
    elif parameters:
        _print_parameters(facts["parameters_defaults"])
    elif license_:
        print(facts["license"] or "")
    else:
        _print_facts(facts)


def _local_facts(name: str) -> tuple[dict[str, Any], str]:
    from ember.store.modelfile import render_modelfile

    source = resolve_model(name)
    if source.upstream is not None:
        from ember.upstream.facts import upstream_facts, upstream_modelfile

        return upstream_facts(source), upstream_modelfile(source)
    facts = directory_facts(source) if source.engine == TRANSFORMERS else model_facts(source, read_gguf(source.path))
    text = render_modelfile(
        from_=str(source.path),
        parameters=facts["parameters_defaults"],
        template=source.template,
        system=source.system,
        messages=facts["messages"],
        license=[source.license] if source.license else [],
        adapters=facts["adapters"],
    )
    return facts, text


def _print_parameters(parameters: dict[str, Any]) -> None:
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            print(f"{key:<20}{json.dumps(item) if isinstance(item, str) else item}")


def _print_facts(facts: dict[str, Any]) -> None:
    print("  Model")
    for label, key in (
        ("engine", "engine"),
        ("architecture", "architecture"),
        ("parameters", "parameter_size"),
        ("context length", "context_length"),
        ("embedding length", "embedding_length"),
        ("layers", "layers"),
        ("quantization", "quantization"),
    ):
        print(f"    {label:<20}{facts.get(key)}")
    if facts.get("upstream"):
        upstream = facts["upstream"]
        print("\n  Upstream")
        print(f"    {'model':<20}{upstream['model']}")
        for url in upstream["replicas"]:
            print(f"    {'replica':<20}{url}")
        if upstream.get("key_env"):
            print(f"    {'key from':<20}${upstream['key_env']}")
    if facts["parameters_defaults"]:
        print("\n  Parameters")
        for key, value in facts["parameters_defaults"].items():
            for item in value if isinstance(value, list) else [value]:
                print(f"    {key:<20}{json.dumps(item) if isinstance(item, str) else item}")
    if facts["system"]:
        print("\n  System")
        for line in facts["system"].splitlines():
            print(f"    {line}")
    if facts["adapters"]:
        print("\n  Adapters")
        for adapter in facts["adapters"]:
            print(f"    {adapter}")
    if facts["license"]:
        print("\n  License")
        for line in facts["license"].splitlines()[:2]:
            print(f"    {line}")
    if facts["template"]:
        print("\n  Template")
        print(f"    {len(facts['template'])} characters of Jinja; `ember show {facts['name']} --template` prints it")


def create(
    name: Annotated[str, typer.Argument(help="Name of the new model.")],
    file: Annotated[Path, typer.Option("-f", "--file", help="The Modelfile.")] = Path("Modelfile"),
    quantize: Annotated[str | None, typer.Option("-q", "--quantize", help="Quantize to q4_0, q4_K_M, q8_0 ...")] = None,
) -> None:
    """Create a model from a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE, ADAPTER)."""
    from ember.store.create import create as create_model

    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"no Modelfile at {file}; give one with -f PATH") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"cannot read the Modelfile {file}: {error}") from None
    if remote.available():
        created = remote.create(name, file, text, quantize)
    else:
        created = str(create_model(name, text, base_dir=file.resolve().parent, quantize=quantize).name)
    print(f"created {created}", file=sys.stderr)


def copy(
    source: Annotated[str, typer.Argument(help="Existing model.")],
    target: Annotated[str, typer.Argument(help="New name.")],
) -> None:
    """Copy a model under a new name (the files are shared, not duplicated)."""
    copied = remote.copy(source, target) if remote.available() else str(ModelStore().copy(source, target).name)
    print(f"copied '{source}' to '{copied}'", file=sys.stderr)


def remove(names: Annotated[list[str], typer.Argument(help="Models to remove.")]) -> None:
    """Remove models; files no other model uses are deleted."""
    store = ModelStore()
    for name in names:
        removed = remote.remove(name) if remote.available() else str(store.remove(name).name)
        print(f"deleted '{removed}'", file=sys.stderr)
