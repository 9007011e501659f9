"""Typed settings of the worker process (env prefix DSPY_FLEET_), parsed once at start-up."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

DEFAULT_CONFIG_FILE = Path(__file__).with_name("default_config.yaml")


class CommonSettings(BaseSettings):
    """Settings both processes read: where Redis is, the config file, limits that must agree."""

    model_config = SettingsConfigDict(
        env_prefix="DSPY_FLEET_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["local", "production"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(default=None, description="Defaults to redis_url.")
    result_backend: str | None = Field(default=None, description="Defaults to redis_url.")
    config: Path = Field(default=DEFAULT_CONFIG_FILE, description="Models and programs YAML.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    job_ttl_seconds: int = Field(default=7 * 86400, ge=60)
    cache_url: str | None = Field(default=None, description="L2 cache; defaults to redis_url.")
    cache_ttl_seconds: int = Field(default=86400, ge=1)
    # Both processes must agree on the broker's visibility timeout: with several
    # Celery apps on one Redis the shortest one wins, so it is derived from the
    # same two numbers everywhere instead of being configured twice.
    soft_time_limit: float = Field(default=120.0, gt=0)
    time_limit: float = Field(default=150.0, gt=0)
    # How often consumers look for unacked messages past the visibility timeout.
    # kombu's default sweep is ~100 s (10 s × throttle 10): too slow after a crash.
    restore_sweep_seconds: int = Field(default=10, ge=1)
    visibility_timeout_seconds: int | None = Field(
        default=None, description="Default: 2 × time_limit + 60 s; must exceed time_limit."
    )

    @model_validator(mode="after")
    def _limits_in_order(self) -> CommonSettings:
        if self.time_limit <= self.soft_time_limit:
            raise ValueError("time_limit must be greater than soft_time_limit")
        vt = self.visibility_timeout_seconds
        if vt is not None and vt <= self.time_limit:
            # A shorter timeout redelivers jobs that are still running: double work and cost.
            raise ValueError("visibility_timeout_seconds must be greater than time_limit")
        return self

    @property
    def broker(self) -> str:
        """The broker URL actually used."""
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        """The result backend URL actually used."""
        return self.result_backend or self.redis_url

    @property
    def cache_redis(self) -> str:
        """The L2 cache URL actually used."""
        return self.cache_url or self.redis_url

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis redelivers an unacked job: well above the hard time limit."""
        return self.visibility_timeout_seconds or int(self.time_limit * 2 + 60)


class WorkerSettings(CommonSettings):
    """Settings of a worker process."""

    pool: Literal["threads", "prefork", "solo", "gevent", "eventlet"] = "threads"
    # LLM calls are I/O-bound: one process keeps many in flight.
    concurrency: int = Field(default=64, ge=1, le=1024)
    queues: str = "interactive,batch"
    prefetch_multiplier: int = Field(default=1, ge=1)
    soft_shutdown_timeout: float = Field(default=30.0, ge=0)
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    l1_cache_entries: int = Field(default=10_000, ge=0)
    l1_cache_ttl_seconds: float = Field(default=300.0, ge=0)
    # Followers of a coalesced request wait at most this long for the leader.
    coalesce_lock_seconds: float = Field(default=60.0, gt=0)
    # Circuit breakers (per model alias, shared through Redis; models may override).
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_min_calls: int = Field(default=20, ge=1)
    breaker_window_seconds: int = Field(default=60, ge=1)
    breaker_recovery_seconds: float = Field(default=30.0, gt=0)
    breaker_half_open_max_calls: int = Field(default=3, ge=1)
    breaker_success_threshold: int = Field(default=2, ge=1)
    # Retries of transient provider errors, through Celery (the slot is freed meanwhile).
    max_retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_seconds: float = Field(default=0.5, gt=0)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0)
    # An accepted job still "queued" this long, and nowhere in the broker, is republished.
    recovery_after_seconds: float = Field(default=120.0, ge=1)
    # A provider asking to wait longer than this is not retried (fallbacks instead).
    retry_after_max_seconds: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _breaker_can_close(self) -> WorkerSettings:
        if self.breaker_success_threshold > self.breaker_half_open_max_calls:
            # Otherwise a half-open breaker runs out of probes before it can close.
            raise ValueError("breaker_success_threshold must be <= breaker_half_open_max_calls")
        return self

    @cached_property
    def queue_list(self) -> list[str]:
        """The queues this worker consumes, interactive first."""
        return [q.strip() for q in self.queues.split(",") if q.strip()]


def load_settings(cls: type[SettingsT], **overrides: object) -> SettingsT:
    """Build a settings object, turning pydantic's error into one that names the env var."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, env_prefix="DSPY_FLEET_")) from None


def describe_validation_error(exc: ValidationError, *, env_prefix: str = "") -> str:
    """One line per bad key, naming it the way the user wrote it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        name = f"{env_prefix}{loc.upper()}" if env_prefix and err["loc"] else loc
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {err['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)
