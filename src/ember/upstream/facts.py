"""What `ember show` and /api/show say of an upstream model: its servers and defaults, never its key (only the
name of the variable that holds it)."""

from __future__ import annotations

from typing import Any

from ember.store.modelfile import render_modelfile
from ember.store.resolve import ModelSource

DETAILS = {"parent_model": "", "format": "upstream", "family": "upstream", "families": ["upstream"],
           "parameter_size": "", "quantization_level": ""}  # fmt: skip


def upstream_info(source: ModelSource) -> dict[str, Any]:
    """/api/show's model_info: the model's name on its servers, the replicas, the context ember assumes."""
    assert source.upstream is not None
    return {
        "general.architecture": "upstream",
        "upstream.model": source.upstream.model,
        "upstream.replicas": list(source.upstream.replicas),
        "upstream.key_env": source.upstream.key_env,
        "upstream.context_length": source.parameters.get("num_ctx"),
    }


def upstream_modelfile(source: ModelSource) -> str:
    return render_modelfile(
        from_=source.upstream.model if source.upstream else "",
        parameters=dict(source.parameters),
        template=None,
        system=source.system,
        messages=[dict(m) for m in source.messages],
        license=[source.license] if source.license else [],
        adapters=[],
        upstream=source.upstream,
    )


def upstream_facts(source: ModelSource) -> dict[str, Any]:
    """The facts `ember show` prints (the keys of cli.models.model_facts), for an upstream model."""
    info = upstream_info(source)
    return {
        "name": source.name,
        "engine": "upstream",
        "architecture": "upstream",
        "parameters": 0,
        "parameter_size": "",
        "quantization": "",
        "context_length": info["upstream.context_length"],
        "embedding_length": None,
        "layers": None,
        "digest": source.digest,
        "template": None,
        "system": source.system,
        "parameters_defaults": dict(source.parameters),
        "messages": [dict(message) for message in source.messages],
        "adapters": [],
        "license": source.license,
        "upstream": {k.removeprefix("upstream."): v for k, v in info.items() if k.startswith("upstream.")},
    }
