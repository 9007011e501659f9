"""Fault injection settings for the mock LLM server and the per-request decision they produce."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Fields that hold a probability, and fields that hold a non-negative amount.
_RATES = ("error_rate", "hang_rate")
_AMOUNTS = ("latency_ms", "jitter_ms", "hang_seconds")


def _number(key: str, value: Any) -> float:
    """Return `value` as a finite float, or raise ValueError naming `key`."""
    # bool is an int subclass; `true` for a latency is a mistake, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key}: must be finite, got {value!r}")
    return float(value)


def _integer(key: str, value: Any) -> int:
    """Return `value` as an int (2.0 is accepted), or raise ValueError naming `key`."""
    number = _number(key, value)
    if not number.is_integer():
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    return int(number)


def _status(key: str, value: Any, allow_ok: bool = False) -> int:
    """Validate an HTTP status to inject: 400-599 (and 200 when `allow_ok`)."""
    status = _integer(key, value)
    if not (400 <= status <= 599 or (allow_ok and status == 200)):
        allowed = "200 or 400-599" if allow_ok else "400-599"
        raise ValueError(f"{key}: must be {allowed}, got {status}")
    return status


def _non_negative(key: str, value: Any) -> float:
    """Validate a finite number >= 0."""
    number = _number(key, value)
    if number < 0:
        raise ValueError(f"{key}: must be >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class Decision:
    """What the server does with one chat request."""

    status: int = 200
    retry_after: float | None = None
    delay_s: float = 0.0
    hang_s: float = 0.0
    reason: str = ""  # why it fails or hangs, for the request log


@dataclass(frozen=True)
class Overrides:
    """Per-request fault overrides, from `X-Mock-*` headers or a `"mock"` body object."""

    latency_ms: float | None = None
    status: int | None = None
    retry_after: float | None = None
    hang_seconds: float | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Overrides:
        """Parse keys such as `latency_ms` / `Latency-Ms` (strings allowed, as in headers)."""
        values: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            name = key.lower().replace("-", "_")
            if name not in names:
                known = ", ".join(sorted(names))
                raise ValueError(f"{key}: unknown mock override (known: {known})")
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    raise ValueError(f"{key}: expected a number, got {value!r}") from None
            if name == "status":
                values[name] = _status(key, value, allow_ok=True)
            else:
                values[name] = _non_negative(key, value)
        return cls(**values)

    def merged(self, other: Overrides) -> Overrides:
        """Return these overrides with `other`'s set values taking precedence."""
        changes = {k: v for k, v in dataclasses.asdict(other).items() if v is not None}
        return dataclasses.replace(self, **changes)


@dataclass
class Faults:
    """Server-wide fault settings; validated on construction, changeable at run time."""

    latency_ms: float = 0
    jitter_ms: float = 0
    error_rate: float = 0
    error_status: int = 500
    retry_after: float | None = None
    hang_rate: float = 0
    hang_seconds: float = 3600
    fail_next: int = 0
    # Every Nth request fails (0: off): a partial fault that is exact and never fails
    # twice in a row (N >= 2), where error_rate is random and can.
    error_every: int = 0
    # Provider rate limits per model (0: none), enforced before any fault above: see
    # mock_llm.limits (token buckets holding limit_burst_seconds of each rate).
    rpm_limit: int = 0
    tpm_limit: int = 0
    limit_burst_seconds: float = 1.0

    def __post_init__(self) -> None:
        for key in _AMOUNTS:
            setattr(self, key, _non_negative(key, getattr(self, key)))
        for key in _RATES:
            rate = _number(key, getattr(self, key))
            if not 0 <= rate <= 1:
                raise ValueError(f"{key}: must be between 0 and 1, got {rate}")
            setattr(self, key, rate)
        self.error_status = _status("error_status", self.error_status)
        if self.retry_after is not None:
            self.retry_after = _non_negative("retry_after", self.retry_after)
        self.fail_next = _integer("fail_next", self.fail_next)
        if self.fail_next < 0:
            raise ValueError(f"fail_next: must be >= 0, got {self.fail_next}")
        self.error_every = _integer("error_every", self.error_every)
        if self.error_every < 0:
            raise ValueError(f"error_every: must be >= 0, got {self.error_every}")
        for key in ("rpm_limit", "tpm_limit"):
            value = _integer(key, getattr(self, key))
            if value < 0:
                raise ValueError(f"{key}: must be >= 0 (0: unlimited), got {value}")
            setattr(self, key, value)
        self.limit_burst_seconds = _number("limit_burst_seconds", self.limit_burst_seconds)
        if self.limit_burst_seconds <= 0:
            raise ValueError(f"limit_burst_seconds: must be > 0, got {self.limit_burst_seconds}")
        # Requests counted for error_every; not a setting, so not in to_dict(). A new
        # Faults (every PUT /_mock/faults) starts counting again.
        self._counted = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from a JSON-like mapping; unknown keys or bad values raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"faults: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            names = ", ".join(sorted(known))
            raise ValueError(f"{unknown[0]}: unknown fault setting (known: {names})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def updated(self, patch: Mapping[str, Any]) -> Faults:
        """Return a new Faults with `patch` applied on top (partial update)."""
        if not isinstance(patch, Mapping):
            raise ValueError(f"faults: expected a JSON object, got {type(patch).__name__}")
        return Faults.from_dict({**self.to_dict(), **patch})

    def _count(self) -> int:
        self._counted += 1
        return self._counted

    def decide(self, rng: random.Random, overrides: Overrides | None = None) -> Decision:
        """Decide the fate of one chat request. The caller must hold the server's lock."""
        ov = overrides or Overrides()
        # Draw every random number on every request, in a fixed order, so a seeded
        # run gives the same sequence whatever the overrides or counters say.
        error_roll, hang_roll, jitter_roll = rng.random(), rng.random(), rng.random()

        delay_ms = self.latency_ms + (2 * jitter_roll - 1) * self.jitter_ms
        if ov.latency_ms is not None:
            delay_ms = ov.latency_ms
        delay_s = max(0.0, delay_ms) / 1000

        status, reason = 200, ""
        if ov.status is not None:
            # A forced status (even 200) bypasses random errors and leaves fail_next alone.
            status, reason = ov.status, "forced" if ov.status != 200 else ""
        elif self.fail_next > 0:
            self.fail_next -= 1
            status, reason = self.error_status, "fail_next"
        elif self.error_every and self._count() % self.error_every == 0:
            status, reason = self.error_status, "error_every"
        elif error_roll < self.error_rate:
            status, reason = self.error_status, "error_rate"

        retry_after = ov.retry_after if ov.retry_after is not None else self.retry_after
        if status not in (429, 503) and ov.retry_after is None:
            retry_after = None  # Retry-After only means something on 429/503

        hang_s = 0.0
        if status == 200:
            if ov.hang_seconds is not None:
                hang_s = ov.hang_seconds  # X-Mock-Hang-Seconds: 0 exempts a request from hangs
            elif hang_roll < self.hang_rate:
                hang_s = self.hang_seconds
            reason = "hang" if hang_s > 0 else reason
        return Decision(status, retry_after, delay_s, hang_s, reason)
