"""A small Ollama-style registry for tests, on the local FileServer; nothing leaves the machine.

    registry = LocalRegistry(server)
    registry.publish("library/tiny:1b", [(MODEL_MEDIA_TYPE, gguf_bytes), (TEMPLATE_MEDIA_TYPE, b"{{ .Prompt }}")])

It answers what Ollama's client asks (server/images.go, server/download.go):
- GET /v2/{namespace}/{model}/manifests/{tag}: the manifest, `{schemaVersion, mediaType, config, layers}`;
- GET /v2/{namespace}/{model}/blobs/{digest}: a 302 to /cdn/{digest}, as the real registry redirects to its CDN,
  which serves the bytes with Range support (so a pull can resume).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ember.store.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE
from tests.http_server import FileServer


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LocalRegistry:
    def __init__(self, server: FileServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return self.server.base_url

    def manifest_path(self, repository: str, tag: str) -> str:
        return f"/v2/{repository}/manifests/{tag}"

    def blob_path(self, repository: str, digest: str) -> str:
        return f"/v2/{repository}/blobs/{digest}"

    def publish(
        self,
        name: str,
        layers: list[tuple[str, bytes]],
        *,
        config: dict[str, Any] | None = None,
        served: dict[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Serve `namespace/model:tag` with these (media type, bytes) layers; returns the manifest.

        `served` replaces the bytes served for a digest (a registry or CDN that sends the wrong file).
        """
        repository, tag = name.rsplit(":", 1)
        config_bytes = json.dumps(
            config or {"model_format": "gguf", "model_family": "llama", "file_type": "Q4_1"}
        ).encode()
        entries = []
        for media_type, data in [(CONFIG_MEDIA_TYPE, config_bytes), *layers]:
            digest = digest_of(data)
            body = (served or {}).get(digest, data)
            self.server.files[f"/cdn/{digest}"] = body
            self.server.redirects[self.blob_path(repository, digest)] = f"/cdn/{digest}"
            entries.append({"mediaType": media_type, "digest": digest, "size": len(data)})
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": entries[0],
            "layers": entries[1:],
        }
        self.server.json_routes[self.manifest_path(repository, tag)] = manifest
        return manifest

    def blob_requests(self, digest: str) -> list[Any]:
        """The requests for a blob's bytes (after the redirect)."""
        return self.server.requests_to(f"/cdn/{digest}")
