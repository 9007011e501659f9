"""Provider rate limits for the mock LLM: requests and tokens per minute, per model.

A provider limits each account per model by requests per minute (RPM) and tokens per
minute (TPM), and answers 429 with ``Retry-After`` above them. OpenAI documents that its
limits are quantized: a per-minute limit is enforced over shorter periods (60,000
requests/minute may be enforced as 1,000 requests/second), so a burst of a whole
minute's worth is refused. Here each limit is a token bucket that holds ``burst_seconds``
of its rate (default 1 s) and refills continuously; a request takes one request token at
admission, and its reported ``total_tokens`` are debited from the token bucket when it
is answered (a provider cannot know the answer's length before), so a bucket may go
negative and then refuses requests until it has refilled above zero.

Source of the quantization: OpenAI's "Rate limits" guide (platform.openai.com/docs/
guides/rate-limits); the ``x-ratelimit-*`` headers mirror the ones it documents there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Bucket:
    """One token bucket: ``rate`` tokens per second, holding at most ``capacity``."""

    rate: float
    capacity: float
    level: float  # may go below zero (tokens debited after the answer)
    stamp: float  # when ``level`` was last brought up to date

    def refill(self, now: float) -> None:
        """Add what accrued since the last look."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def seconds_until(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (0 when it already has)."""
        return max(0.0, (amount - self.level) / self.rate)


@dataclass(frozen=True)
class Refusal:
    """Why a request is over a limit, and when to try again (seconds)."""

    limit: str  # "requests" or "tokens"
    per_minute: int
    retry_after: float


@dataclass
class ProviderLimits:
    """RPM and TPM per model (0: unlimited); not thread-safe (the server's lock guards it)."""

    rpm: int = 0
    tpm: int = 0
    burst_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, Bucket] = field(default_factory=dict)
    _tokens: dict[str, Bucket] = field(default_factory=dict)

    def _bucket(self, table: dict[str, Bucket], model: str, per_minute: int) -> Bucket:
        now = self.clock()
        if model not in table:  # a new bucket starts full
            rate = per_minute / 60.0
            capacity = max(1.0, rate * self.burst_seconds)
            table[model] = Bucket(rate=rate, capacity=capacity, level=capacity, stamp=now)
        bucket = table[model]
        bucket.refill(now)
        return bucket

    def admit(self, model: str) -> Refusal | None:
        """Take one request for ``model``; a Refusal (nothing taken) when over a limit."""
        requests = self._bucket(self._requests, model, self.rpm) if self.rpm else None
        tokens = self._bucket(self._tokens, model, self.tpm) if self.tpm else None
        if requests is not None and requests.level < 1:
            return Refusal("requests", self.rpm, requests.seconds_until(1))
        if tokens is not None and tokens.level <= 0:
            # Wait until the bucket is above zero again (one token's worth).
            return Refusal("tokens", self.tpm, tokens.seconds_until(1))
        if requests is not None:
            requests.level -= 1
        return None

    def charge(self, model: str, total_tokens: int) -> None:
        """Debit an answered request's tokens (the bucket may go below zero)."""
        if self.tpm:
            self._bucket(self._tokens, model, self.tpm).level -= total_tokens

    def headers(self, model: str) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for ``model`` (only for the limits that are set)."""
        out: dict[str, str] = {}
        for name, table, per_minute in (
            ("requests", self._requests, self.rpm),
            ("tokens", self._tokens, self.tpm),
        ):
            if not per_minute:
                continue
            bucket = self._bucket(table, model, per_minute)
            reset = bucket.seconds_until(bucket.capacity)
            out[f"x-ratelimit-limit-{name}"] = str(per_minute)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = f"{reset:.3f}s"
        return out
