"""ember's settings: every EMBER_* environment variable in one place, with its default and meaning."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    legacy = Path.home() / ".ember"
    return legacy if legacy.exists() else Path(platformdirs.user_data_dir("ember", appauthor=False))


def ember_home() -> Path:
    """EMBER_HOME as `Settings().home` reads it (the name in any case), without building every setting: the model
    store looks it up on each request, and a whole Settings costs a millisecond of the server's event loop."""
    value = os.environ.get("EMBER_HOME")
    if value is None:
        value = next((value for name, value in os.environ.items() if name.upper() == "EMBER_HOME"), None)
    return Path(value) if value is not None else _default_home()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Where ember keeps models and its database.")
    host: str = Field("127.0.0.1:11434", description="Address of the ember server (host:port).")
    default_model: str = Field("smollm2", description="Model used when a command names none.")
    log_level: str = Field("WARNING", description="Log level for ember's own messages on stderr.")
    keep_alive: str = Field("5m", description="How long a model stays loaded after its last request (-1: always).")
    num_parallel: int = Field(4, ge=1, le=256, description="Sequences each loaded model decodes at once (slots).")
    upstream_health_interval: float = Field(
        10.0, gt=0, description="Seconds between health checks of each healthy replica of an upstream model."
    )
    max_loaded_models: int = Field(3, ge=1, description="Most models loaded at once; the least recently used goes.")
    max_queue: int = Field(512, ge=0, description="Requests that may wait per model before the server says busy.")
    request_timeout: float | None = Field(None, gt=0, description="Seconds a request may wait in the queue.")
    api_keys: str = Field("", description="Comma-separated API keys; when set, every route but /health needs one.")
    allowed_origins: str = Field(
        "http://localhost,http://127.0.0.1,https://localhost,https://127.0.0.1",
        description="Comma-separated CORS origins (any port) allowed to call the API from a browser.",
    )
    allowed_hosts: str = Field(
        "", description="Extra Host header values accepted besides localhost names (DNS-rebinding protection)."
    )
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_num_predict: int = Field(32768, ge=1, description="Cap on num_predict / max_tokens per request.")
    max_num_ctx: int = Field(131072, ge=256, description="Cap on num_ctx per request.")
    max_n: int = Field(8, ge=1, description="Cap on n (completions per request) in the OpenAI API.")
    openai_token_encoding: str = Field(
        "cl100k_base",
        description="How /v1/embeddings reads token-id inputs: a tiktoken encoding (cl100k_base: what OpenAI "
        "clients such as LangChain's OpenAIEmbeddings send), or `model` for the model's own token ids.",
    )
    deterministic: bool = Field(
        False, description="Prefill in exact 48-token chunks: temp-0 answers never depend on the KV cache (slower)."
    )
    kv_cache_ram: int | None = Field(
        None,
        ge=0,
        description="Bytes of host RAM per loaded model for the KV of conversations whose slot was reused "
        "(LRU); default a quarter of the available memory, at most 8 GiB; 0 disables it.",
    )
    kv_cache_disk: int = Field(
        0,
        ge=0,
        description="Bytes of disk per model (under EMBER_HOME/kv) for the KV its slots and host RAM held when it "
        "unloaded, restored when a conversation comes back after a restart; 0 (the default) turns it off.",
    )
    load_timeout: float = Field(300.0, gt=0, description="Seconds a model may take to load before the load fails.")
    registry: str = Field(
        "https://registry.ollama.ai",
        description="Base URL of the Ollama-style registry that `ember pull NAME[:TAG]` pulls library names from.",
    )
    batch_slots: int | None = Field(
        None, ge=1, description="Most of a model's slots batch lines may hold at once (default: all but one)."
    )
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest file accepted by POST /v1/files (batch input)."
    )
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ broker of `ember worker`.")
    amqp_queue: str = Field("requests", description="Queue `ember worker` answers requests from.")
    amqp_results_queue: str = Field(
        "responses", description="Queue for answers to messages without reply_to (`ember worker`)."
    )
    worker_max_attempts: int = Field(
        3, ge=1, le=100, description="Deliveries of one request before `ember worker` dead-letters it."
    )
    first_token_timeout: float | None = Field(
        None, gt=0, description="Seconds a request may wait for its first token once its model is loaded (504 after)."
    )
    total_timeout: float | None = Field(
        None, gt=0, description='Seconds an answer may take in all, model load apart (504 after); "timeout" overrides.'
    )
    max_timeout: float = Field(
        3600.0, gt=0, description='Largest total timeout a request may ask for ("timeout" or X-Ember-Timeout).'
    )
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds SIGTERM lets answers in flight finish before they end with an error."
    )
    log_max_bytes: int = Field(
        20 * 1024 * 1024, ge=4096, description="Size at which logs/requests.jsonl and logs/server.jsonl rotate."
    )
    log_content: bool = Field(False, description="Also log each request's prompt and answer in requests.jsonl.")
    metrics_public: bool = Field(False, description="Serve /metrics without an API key even when keys are set.")
    fallbacks: str = Field(
        "", description='Fallback models, "model=fallback1,fallback2;other=fallback3" (besides PARAMETER fallback).'
    )
    circuit_failures: int = Field(3, ge=1, description="Runner crashes or failed loads that open a model's circuit.")
    circuit_window: float = Field(60.0, gt=0, description="Seconds within which those failures count.")
    circuit_cooldown: float = Field(30.0, gt=0, description="Seconds an open circuit refuses before one probe.")
    alert_webhook: str = Field("", description="URL that alerts are POSTed to as JSON.")
    alert_smtp: str = Field(
        "", description="Mail server for alerts: smtp://host:port or smtp://user:password@host:port (smtps:// for TLS)."
    )
    alert_mail_to: str = Field("root@localhost", description="Who alert mails go to.")
    alert_mail_from: str = Field("ember@localhost", description="The sender of alert mails.")
    alert_interval: float = Field(300.0, ge=0, description="Seconds before the same alert is sent again.")
    alert_ttft_p95_ms: float | None = Field(
        None, gt=0, description="Alert when time to first token p95 over 5 minutes is above this (ms)."
    )
    alert_gpu_temperature: float | None = Field(None, gt=0, description="Alert when a GPU is hotter (°C).")
    probe_interval: float | None = Field(
        None, gt=0, description="Seconds between self-probes (a one-token generation); a failure alerts."
    )
    response_cache: int = Field(
        0, ge=0, description="Answers of deterministic requests (temperature 0 or a seed) kept for exact repeats."
    )
    schedules: bool = Field(True, description="Run the stored schedules (`ember schedule`) inside `ember serve`.")

    @property
    def host_and_port(self) -> tuple[str, int]:
        """EMBER_HOST split as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port`, or a URL."""
        text = self.host.strip()
        for scheme in ("http://", "https://"):
            text = text.removeprefix(scheme)
        text = text.rstrip("/")
        host, _, port = text.rpartition(":") if ":" in text.rsplit("]", 1)[-1] else (text, "", "")
        return (host.strip("[]") or "127.0.0.1"), int(port or 11434)

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks_are_pairs(cls, value: str) -> str:
        for part in value.split(";"):
            model, equals, names = part.partition("=")
            if part.strip() and (not equals or not model.strip() or not names.strip()):
                raise ValueError(f'{part.strip()!r} is not "model=fallback1,fallback2"; separate models with ";"')
        return value

    def fallback_map(self) -> dict[str, list[str]]:
        """EMBER_FALLBACKS as {model: [fallback, ...]}."""
        mapping: dict[str, list[str]] = {}
        for part in self.fallbacks.split(";"):
            model, _, names = part.partition("=")
            if model.strip() and names.strip():
                mapping[model.strip()] = [name.strip() for name in names.split(",") if name.strip()]
        return mapping

    @property
    def base_url(self) -> str:
        host, port = self.host_and_port
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
