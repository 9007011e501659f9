"""Typed settings of the API process (env prefix DSPY_FLEET_), parsed once at start-up."""

from __future__ import annotations

from pydantic import Field, SecretStr

from worker.settings import CommonSettings


class ApiSettings(CommonSettings):
    """Settings of an API process."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    # gunicorn: a few processes, many threads each; waiting requests mostly sleep.
    api_workers: int = Field(default=2, ge=1, le=64)
    api_threads: int = Field(default=16, ge=1, le=256)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_wait_seconds: float = Field(default=60.0, ge=0, le=60)
    # A worker counts as live when it beat within this many seconds.
    worker_max_age_seconds: float = Field(default=15.0, gt=0)
    # "tenant:sha256hex[:admin],..." (see api/auth.py); empty = open API (refused in production).
    api_keys: SecretStr = Field(default=SecretStr(""))
    # Items one POST /v1/batches may hold (the body limit applies too).
    max_batch_items: int = Field(default=10_000, ge=1, le=100_000)
    # How stale the API's copy of the worker-published program catalog may be.
    catalog_ttl_seconds: float = Field(default=2.0, ge=0)
