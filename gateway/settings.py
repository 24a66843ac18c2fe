"""Process settings from the environment (prefix DISTILLGATE_) and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where to listen and what to load. The YAML config says what to serve."""

    model_config = SettingsConfigDict(env_prefix="DISTILLGATE_", extra="forbid")

    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The traffic log's database (overrides the config's traffic.dsn): a PostgreSQL URL
    # shared by replicas, e.g. from a Kubernetes secret.
    traffic_dsn: str | None = None
    # worker processes (overrides the config's server.workers); `serve --workers`
    workers: int | None = Field(None, ge=1, le=1024)
