"""ember's settings: every EMBER_* environment variable in one place, with its default and meaning."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    legacy = Path.home() / ".ember"
    return legacy if legacy.exists() else Path(platformdirs.user_data_dir("ember", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Where ember keeps models and its database.")
    host: str = Field("127.0.0.1:11434", description="Address of the ember server (host:port).")
    default_model: str = Field("smollm2", description="Model used when a command names none.")
    log_level: str = Field("WARNING", description="Log level for ember's own messages on stderr.")


@cache
def settings() -> Settings:
    return Settings()
