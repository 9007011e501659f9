"""Typed settings of the worker process (env prefix DSPY_FLEET_), parsed once at start-up."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dspy_fleet.errors import ConfigError

if TYPE_CHECKING:  # fleet_config imports this module
    from dspy_fleet.fleet_config import FleetConfig

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

DEFAULT_CONFIG_FILE = Path(__file__).with_name("default_config.yaml")

# Broker URL schemes the fleet runs on: kombu's Redis transport and RabbitMQ (py-amqp).
REDIS_BROKER_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
AMQP_BROKER_SCHEMES = ("amqp", "amqps", "pyamqp")
BROKER_SCHEMES = REDIS_BROKER_SCHEMES + AMQP_BROKER_SCHEMES


class CommonSettings(BaseSettings):
    """Settings both processes read: where Redis is, the config file, limits that must agree."""

    model_config = SettingsConfigDict(
        env_prefix="DSPY_FLEET_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["local", "production"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(
        default=None,
        description="Defaults to redis_url. Redis (redis://, rediss://, unix://) or RabbitMQ "
        "(amqp://, amqps://); any other scheme is refused at start-up.",
    )
    result_backend: str | None = Field(default=None, description="Defaults to redis_url.")
    config: Path = Field(default=DEFAULT_CONFIG_FILE, description="Models and programs YAML.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Job inputs and outputs are customer data and logs go to shared systems: no log line
    # (nor the task args Flower shows) carries them unless an operator opts in here.
    log_payloads: bool = False
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
        default=None,
        description="Default: 2 × time_limit + 60 s. With leases it need not exceed a "
        "running job's limits; JOB_TTL_SECONDS must exceed it (check_redelivery_window).",
    )
    # Connect and read timeout of every Redis and broker client (job store, cache, breakers,
    # heartbeats, kombu's publish and consume, Celery's result backend): a hung Redis must
    # become an error within this, not a request or a worker thread that waits for it.
    redis_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # Only for redis+sentinel:// URLs (README, Redis Sentinel): the Sentinels' own password,
    # kept apart from the data nodes' (the URL's userinfo), as Sentinel ACLs usually are.
    sentinel_password: SecretStr | None = Field(
        default=None,
        description="Password of the Sentinels named by redis+sentinel:// URLs (not the "
        "data nodes'; theirs is the URL's userinfo).",
    )
    # An accepted job not claimed by a worker this long is first checked by the due sweep
    # (its message still waiting in its queue?); every process that creates jobs sets it.
    recovery_after_seconds: float = Field(default=120.0, ge=1)
    # Webhooks (README, Webhooks): callback URLs on these CIDRs or host names pass the SSRF
    # guard although they are private, loopback or link-local. Comma-separated; the API
    # checks it at submission and the worker again at delivery, so both must agree.
    callback_allow: str = ""

    @field_validator("callback_allow")
    @classmethod
    def _allow_list_parses(cls, value: str) -> str:
        from dspy_fleet.webhooks.urls import AllowList  # it imports the contract, not us

        AllowList.parse(value)  # ValueError names the bad entry
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_supported(cls, value: str | None) -> str | None:
        # Recovery, queue lengths and readiness ask the broker through
        # dspy_fleet/broker/backends.py, which knows these two transports only.
        if value is not None and urlsplit(value).scheme.lower() not in BROKER_SCHEMES:
            schemes = ", ".join(s + "://" for s in BROKER_SCHEMES)
            raise ValueError(f"unsupported broker URL scheme; supported: {schemes}")
        return value

    @model_validator(mode="after")
    def _limits_in_order(self) -> CommonSettings:
        if self.time_limit <= self.soft_time_limit:
            raise ValueError("time_limit must be greater than soft_time_limit")
        # The limits exactly-once execution depends on are checked in one place, with the
        # models' timeouts in hand: check_redelivery_window.
        return self

    @property
    def redis_timeouts(self) -> dict[str, Any]:
        """redis-py's connect and read timeouts for a client of this process."""
        return {
            "socket_timeout": self.redis_timeout_seconds,
            "socket_connect_timeout": self.redis_timeout_seconds,
        }

    @property
    def sentinel_secret(self) -> str | None:
        """The Sentinels' password in clear, for the connection factory."""
        return self.sentinel_password.get_secret_value() if self.sentinel_password else None

    @field_validator("redis_url", "broker_url", "result_backend", "cache_url")
    @classmethod
    def _sentinel_url_parses(cls, value: str | None) -> str | None:
        from dspy_fleet.store.connection import is_sentinel, parse_sentinel_url

        if value is not None and is_sentinel(value):
            parse_sentinel_url(value)  # ValueError names what is wrong
        return value

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
    # "callbacks" is the webhook delivery queue (worker/webhooks.py): a worker that leaves
    # it out delivers no webhooks (another worker must consume it).
    queues: str = "interactive,batch,callbacks"
    prefetch_multiplier: int = Field(default=1, ge=1)
    soft_shutdown_timeout: float = Field(default=30.0, ge=0)
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Loopback by default, like the API and Flower: a container image or a pod that
    # must be scraped from outside sets 0.0.0.0 (Dockerfile.worker, the chart do).
    metrics_host: str = "127.0.0.1"
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    l1_cache_entries: int = Field(default=10_000, ge=0)
    l1_cache_ttl_seconds: float = Field(default=300.0, ge=0)
    # TTL of a coalescing lock (renewed while its leader computes): how long after a
    # leader died one follower takes over.
    coalesce_lock_seconds: float = Field(default=60.0, gt=0)
    # Circuit breakers (per model alias, shared through Redis; models may override).
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_min_calls: int = Field(default=20, ge=1)
    breaker_window_seconds: int = Field(default=60, ge=1)
    breaker_recovery_seconds: float = Field(default=30.0, gt=0)
    breaker_half_open_max_calls: int = Field(default=3, ge=1)
    breaker_success_threshold: int = Field(default=2, ge=1)
    # A run of failure_threshold faults recorded while other calls were in flight opens
    # the breaker once it stood this long with no success (0: at once); see
    # dspy_fleet/store/breakers.py.
    breaker_settle_seconds: float = Field(default=2.0, ge=0)
    # Retries of transient provider errors, scheduled in the due-time index (slot freed).
    max_retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_seconds: float = Field(default=0.5, gt=0)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0)
    # A running job's lease (Redis clock): renewed every third of it while the job runs; a
    # lease left to lapse (its worker died) lets the next delivery take the job over.
    lease_seconds: float = Field(default=30.0, ge=1)
    # A provider asking to wait longer than this is not retried (fallbacks instead).
    retry_after_max_seconds: float = Field(default=120.0, gt=0)
    # Pacing to provider limits (dspy_fleet/store/pacing.py): the share of each model's
    # rate kept for interactive jobs, how far ahead slots are booked, the burst each rate
    # allows, waits short enough to sleep in the worker thread, and the provider 429s one
    # job may draw before it fails with rate_limited.
    interactive_share: float = Field(default=0.2, ge=0, lt=1)
    pacing_horizon_seconds: float = Field(default=2.0, gt=0)
    # A quarter second: a provider that enforces its per-minute limit per second keeps
    # three quarters of a second of slack for calls that leave a busy worker in a clump.
    rate_burst_seconds: float = Field(default=0.25, gt=0)
    pacing_inline_wait_seconds: float = Field(default=1.0, ge=0)
    max_rate_limited: int = Field(default=20, ge=0)
    # Webhooks (worker/webhooks.py). Signing secrets per tenant as a JSON object
    # {"tenant": "secret", "*": "default for the other tenants"}; a tenant without one gets
    # no webhook (its callback fails with last_error saying so), never an unsigned one.
    callback_secrets: dict[str, SecretStr] = Field(default_factory=dict)
    # Connect and read timeout of one delivery attempt, each: a receiver that hangs costs
    # a worker thread at most a few seconds, never a prediction slot for long.
    callback_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    # How long a callback is retried after its first attempt before it is marked failed.
    callback_retry_seconds: float = Field(default=3600.0, gt=0)
    # Backoff between attempts: doubling from the first, capped, each with jitter.
    callback_backoff_seconds: float = Field(default=1.0, gt=0)
    callback_backoff_max_seconds: float = Field(default=300.0, gt=0)
    # Deliveries one worker process runs at once; more wait in Redis (a dead or slow
    # receiver can hold at most this many of the pool's threads).
    callback_concurrency: int = Field(default=4, ge=1, le=256)

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


# What a job's record (and its finished marker, which lives as long) must outlive: a job
# waiting for its retry, or for the recovery sweep's first look, must still be there.
# (settings attribute, its variable); a process checks those its settings have.
_RECORD_OUTLIVES = (
    ("retry_after_max_seconds", "DSPY_FLEET_RETRY_AFTER_MAX_SECONDS"),
    ("retry_backoff_max_seconds", "DSPY_FLEET_RETRY_BACKOFF_MAX_SECONDS"),
    ("recovery_after_seconds", "DSPY_FLEET_RECOVERY_AFTER_SECONDS"),
    # The callback state lives on the job's record: it must outlive the retries.
    ("callback_retry_seconds", "DSPY_FLEET_CALLBACK_RETRY_SECONDS"),
)


def _num(value: float) -> str:
    return f"{value:g}"


def check_redelivery_window(settings: CommonSettings, config: FleetConfig | None = None) -> None:
    """Refuse limits that break exactly-once execution (one ConfigError naming them all).

    The one place these rules live; the worker and the API call it at start-up.

    What the broker's redelivery window (the visibility timeout) must exceed, with leases:
    nothing that a running job waits for. A redelivery while the job's lease lives is
    acknowledged and dropped without a provider call, and a job whose worker died is taken
    over when its lease lapses (worker/recovery.py), so TIME_LIMIT, the models' timeouts,
    COALESCE_LOCK_SECONDS (renewed while the leader calls) and the retry waits (kept in
    Redis, not in a countdown message) may all be longer than it.

    What must hold:
    - JOB_TTL_SECONDS > the visibility timeout: a late redelivery must find the job's
      finished marker, or it would run and bill again;
    - JOB_TTL_SECONDS > RETRY_AFTER_MAX_SECONDS, RETRY_BACKOFF_MAX_SECONDS and
      RECOVERY_AFTER_SECONDS: a job waiting for its retry or for recovery keeps its record;
    - each model's timeout (one attempt per call: worker/lm.py sets num_retries=0)
      < SOFT_TIME_LIMIT: a slow provider ends as the model's provider_timeout, inside the
      job's limits, not as a job killed mid-call.
    A process checks what its settings hold: the API has no worker-only limits.
    """
    vt = settings.visibility_timeout
    if settings.visibility_timeout_seconds is None:
        vt_name = f"DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS (unset: 2 × TIME_LIMIT + 60 = {vt})"
    else:
        vt_name = f"DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS={vt}"
    ttl = settings.job_ttl_seconds
    ttl_name = f"DSPY_FLEET_JOB_TTL_SECONDS={ttl}"
    problems = []
    if ttl <= vt:
        problems.append(f"{ttl_name} must exceed {vt_name}")
    for attr, name in _RECORD_OUTLIVES:
        limit = getattr(settings, attr, None)
        if limit is not None and ttl <= limit:
            problems.append(f"{ttl_name} must exceed {name}={_num(limit)}")
    soft = settings.soft_time_limit
    for alias, model in (config.models if config is not None else {}).items():
        if model.timeout >= soft:
            problems.append(
                f"DSPY_FLEET_SOFT_TIME_LIMIT={_num(soft)} must exceed DSPY_FLEET_CONFIG "
                f"models.{alias}.timeout={_num(model.timeout)}"
            )
    if problems:
        raise ConfigError(
            "invalid configuration: a job's record must outlive its last possible delivery, "
            "and a provider call must end inside the job's time limit: " + "; ".join(problems)
        )


def load_settings(cls: type[SettingsT], **overrides: object) -> SettingsT:
    """Build a settings object, turning pydantic's error into one that names the env var."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]  # pydantic validates them
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, env_prefix="DSPY_FLEET_")) from None


def _without_password(value: object) -> object:
    """A URL's password masked (a refused broker or Redis URL may carry one); else the value."""
    if isinstance(value, str) and "://" in value:
        try:
            password = urlsplit(value).password
        except ValueError:
            return value
        if password:
            return value.replace(f":{password}@", ":***@", 1)
    return value


def describe_validation_error(exc: ValidationError, *, env_prefix: str = "") -> str:
    """One line per bad key, naming it the way the user wrote it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        name = f"{env_prefix}{loc.upper()}" if env_prefix and err["loc"] else loc
        value = err.get("input")
        masked = _without_password(value)
        shown = "" if isinstance(value, dict) else f" (got {masked!r})"
        if isinstance(masked, str) and "@" in masked and ":***@" not in masked:
            shown = " (value not shown: it may hold a password)"  # userinfo we cannot parse
        lines.append(f"{name}: {err['msg']}{shown}")
    return "invalid configuration: " + "; ".join(lines)
