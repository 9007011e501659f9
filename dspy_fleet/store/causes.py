"""What each model's provider last refused a call for, shared by the fleet through Redis.

A LiteLLM proxy that gets a 401 from the provider cools the deployment down and answers the
following calls ``429 No deployments available for selected model``, which (in current
LiteLLM) does not say why. Taken at its word, that 429 is a transient fault: retried and
counted against the breaker, which opens and hides the cause. So when a call meets a lasting
refusal (the credentials, the billing: see ``REMEMBERED``), the worker writes it here, and a
cooldown answer that gives no reason is read as that refusal for as long as it may explain
it. Any other answer from the provider (a success, a bad request, an ordinary fault) means
the gateway let calls through again, and the memory is dropped.

Key: ``dspy_fleet:cause:<model alias>`` → JSON ``{"code", "message", "seen_at"}`` with a TTL.
Costs no Redis command on the hot path: a write per refusal, a read per unexplained cooldown
answer, and a delete only from a process that wrote or read a cause it has not yet dropped.
A Redis failure here is logged and the error stays as it was: never a failed job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime

import redis

from dspy_fleet.errors import (
    GatewayCooldownError,
    JobError,
    ProviderAuthError,
    ProviderBillingError,
    ProviderError,
    ProviderRequestError,
)

log = logging.getLogger("dspy_fleet.worker")

PREFIX = "dspy_fleet:cause:"
# The refusals that last until someone acts (a key replaced, an account paid), and that a
# LiteLLM proxy cools a deployment down for (401, 402 and 403 are never retried there).
REMEMBERED: dict[str, type[ProviderRequestError]] = {
    ProviderAuthError.code: ProviderAuthError,
    ProviderBillingError.code: ProviderBillingError,
}
# How long a refusal may explain a cooldown. LiteLLM cools a deployment down for 5 s by
# default (litellm/constants.py DEFAULT_COOLDOWN_TIME_SECONDS) and then lets a call through,
# which meets the refusal again (remembered anew) or does not (forgotten); 300 s covers a
# cooldown an operator lengthened, and bounds a memory that nobody contradicts.
REMEMBER_SECONDS = 300


class CauseBook:
    """The fleet's memory of each model's last lasting refusal (see the module docstring)."""

    def __init__(self, client: redis.Redis, ttl_seconds: float = REMEMBER_SECONDS) -> None:
        self.client = client
        self.ttl = ttl_seconds
        # Models for which this process wrote or read a cause, until when: only these may
        # have one to drop, so a success elsewhere costs no Redis command.
        self._known: dict[str, float] = {}
        self._lock = threading.Lock()

    def explain(self, model: str, error: JobError) -> JobError:
        """``error`` as the fleet understands it: a cooldown answer that says no reason
        becomes the refusal remembered for ``model`` (if any); a refusal is remembered; any
        other answer of the provider drops what was remembered. Never raises RedisError."""
        try:
            if type(error) in REMEMBERED.values():
                self._remember(model, error)
            elif isinstance(error, GatewayCooldownError):
                return self._recall(model, error) or error
            elif isinstance(error, ProviderRequestError) or getattr(error, "status_code", None):
                self.settle(model)  # the provider answered past the gateway
        except redis.RedisError as exc:
            log.warning("cause memory unavailable; %s stays as it is: %s", error.code, exc)
        return error

    def settle(self, model: str) -> None:
        """The provider answered ``model``'s call: drop a refusal this process knew of."""
        with self._lock:
            until = self._known.pop(model, None)
        if until is not None and until > time.monotonic():
            try:
                self.client.delete(PREFIX + model)
            except redis.RedisError as exc:
                log.warning("could not drop %s's remembered refusal (it expires): %s", model, exc)

    def _remember(self, model: str, error: JobError) -> None:
        seen = {"code": error.code, "message": error.message,
                "seen_at": datetime.now(UTC).isoformat()}  # fmt: skip
        self.client.set(PREFIX + model, json.dumps(seen), ex=max(1, int(self.ttl)))
        self._note(model)

    def _recall(self, model: str, cooldown: ProviderError) -> JobError | None:
        raw = self.client.get(PREFIX + model)
        if raw is None:
            return None
        seen = json.loads(raw)
        cls = REMEMBERED.get(seen.get("code"))
        if cls is None:
            return None
        self._note(model)
        status = cooldown.status_code
        return cls(
            f"{seen['message']} (since then the gateway answers {status}, cooling the model "
            "down)",
            details={"status_code": status, "gateway_cooldown": True,
                     "cause_seen_at": seen.get("seen_at")},
        )  # fmt: skip

    def _note(self, model: str) -> None:
        with self._lock:
            self._known[model] = time.monotonic() + self.ttl
