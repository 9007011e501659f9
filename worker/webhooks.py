"""Webhook delivery: the callback sweep and one attempt of one callback.

A job (or batch) with a callback_url is due for delivery the moment it ends (the finish
script puts it in the due-time index, dspy_fleet/store/callbacks.py). Each worker that
consumes the ``callbacks`` queue sweeps that index every half second and publishes a
``dspy_fleet.deliver_callback`` task per due callback onto ``callbacks``; the task makes
one attempt: claim it under a lease, resolve and check the URL (SSRF guard), POST the
body GET /v1/predictions/<id> (or GET /v1/batches/<id>) would return, signed, without
following redirects and with short timeouts, then record the outcome. A failed attempt is
retried from the index after a backoff (no task sleeps, no Celery countdown message: one
held past the broker's visibility timeout would be delivered twice), until
DSPY_FLEET_CALLBACK_RETRY_SECONDS after the first attempt; then it is marked failed.

Prediction work is never held up by a receiver: a delivery never waits for a retry in a
pool thread, an attempt lasts at most a few seconds (connect and read timeouts), a worker
process runs at most DSPY_FLEET_CALLBACK_CONCURRENCY attempts at once (a task that finds
them all busy puts its callback back for a second and returns at once), and a receiver
that keeps failing is probed by one callback at a time (backoff per host) while the
others wait in Redis: a dead receiver costs the fleet one attempt per backoff step, not
one per callback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from dspy_fleet import __version__
from dspy_fleet.errors import CallbackUrlRefusedError
from dspy_fleet.settings import WorkerSettings
from dspy_fleet.store.batches import BatchStore
from dspy_fleet.store.callbacks import CallbackStore, Claim, delivery_id, split_member
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.views import batch_view, prediction_view
from dspy_fleet.webhooks import signing
from dspy_fleet.webhooks.urls import (
    AllowList,
    IPAddress,
    Resolver,
    resolve_checked,
    system_resolver,
)
from worker import metrics

log = logging.getLogger("dspy_fleet.webhooks")

# A task that finds this process's delivery slots all busy puts its callback back this long.
BUSY_DELAY_SECONDS = 1.0
# Entries one sweep takes per delivery slot: bounds what a sweep publishes (each sweep
# every 0.5 s) to what the process can attempt, so a backlog waits in Redis, not as
# messages bouncing between the queue and busy slots.
TAKE_PER_SLOT = 4
ERROR_CHARS = 300  # last_error is cut to this


def backoff(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before the attempt after ``attempt``: base × 2^(attempt-1), capped, with
    "equal jitter" (half fixed, half random) so that a receiver coming back is not hit by
    every callback in the same instant."""
    full = min(cap, base * 2 ** max(0, attempt - 1))
    return full / 2 + full / 2 * rand()


def probe_hold_seconds(settings: WorkerSettings) -> float:
    """How long a failing host's probe keeps its other callbacks waiting before another
    probe may go (the probe's connect and read timeouts, and a second)."""
    return 2 * settings.callback_timeout_seconds + 1


def lease_seconds(settings: WorkerSettings) -> float:
    """How long an attempt's lease lives: longer than the attempt can take (a name
    lookup, then connect, write and read timeouts), so that no second attempt overlaps."""
    return 4 * settings.callback_timeout_seconds + 10


@dataclass
class Webhooks:
    """What a worker process needs to deliver webhooks, built once per process."""

    settings: WorkerSettings
    client: redis.Redis
    ttl_seconds: int
    resolver: Resolver = system_resolver
    allow: AllowList = field(init=False)
    store: CallbackStore = field(init=False)
    jobs: JobStore = field(init=False)
    batches: BatchStore = field(init=False)
    slots: threading.BoundedSemaphore = field(init=False)
    _http: httpx.Client | None = field(default=None, init=False)
    _pid: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.allow = AllowList.parse(self.settings.callback_allow)
        self.store = CallbackStore(self.client)
        self.jobs = JobStore(self.client, self.ttl_seconds)
        self.batches = BatchStore(self.client, self.ttl_seconds)
        self.slots = threading.BoundedSemaphore(self.settings.callback_concurrency)

    @property
    def http(self) -> httpx.Client:
        """This process's HTTP client: no redirects, no proxies from the environment (the
        connection goes to the checked address), no kept-alive connections (one reused for
        another host on the same address would carry the first host's TLS name)."""
        if self._http is None or self._pid != os.getpid():
            self._pid = os.getpid()
            timeout = self.settings.callback_timeout_seconds
            self._http = httpx.Client(
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._http

    def secret(self, tenant: str | None) -> str | None:
        """The tenant's signing secret (or the "*" default), None when it has none."""
        secrets = self.settings.callback_secrets
        found = secrets.get(tenant or "") or secrets.get("*")
        return found.get_secret_value() if found is not None else None


class CallbackSweeper:
    """Publishes a delivery task for every due callback (run by recovery.SweepThread)."""

    def __init__(self, hooks: Webhooks, publish: Callable[[str, int], None]) -> None:
        self.hooks = hooks
        self.publish = publish

    def sweep(self) -> list[str]:
        """Take what is due (a bounded number) and publish it; returns the members."""
        settings = self.hooks.settings
        due = self.hooks.store.take_due(
            settings.callback_retry_seconds, probe_hold_seconds(settings),
            limit=TAKE_PER_SLOT * settings.callback_concurrency,
        )  # fmt: skip
        for member, attempt in due:
            self.publish(member, attempt)
        return [member for member, _ in due]


def deliver(hooks: Webhooks, member: str, attempt: int) -> str:
    """Make attempt ``attempt`` of callback ``member`` ("job:<id>" | "batch:<id>") if it is
    its turn; returns what happened: delivered | retry | failed | unready (a batch not
    ended yet) | done | stale | leased (another delivery's turn: nothing done) | busy
    (this process's delivery slots are all taken: put back for a second)."""
    claim = hooks.store.claim(member, attempt, lease_seconds(hooks.settings))
    if claim.outcome != "go":
        return claim.outcome
    assert claim.token is not None
    settings = hooks.settings
    if not hooks.slots.acquire(blocking=False):
        # Claimed first, so that duplicated tasks (refused by the claim) never take a slot.
        return hooks.store.settle(member, claim.token, "busy", delay=BUSY_DELAY_SECONDS)
    try:
        outcome, error = _attempt(hooks, member, claim)
    finally:
        hooks.slots.release()
    delay = backoff(attempt, settings.callback_backoff_seconds,
                    settings.callback_backoff_max_seconds)  # fmt: skip
    if outcome == "unready":
        delay = BUSY_DELAY_SECONDS * 5
    written = hooks.store.settle(
        member, claim.token, outcome, error=error, delay=delay,
        budget=settings.callback_retry_seconds,
        host_backoff=(settings.callback_backoff_seconds, settings.callback_backoff_max_seconds),
    )  # fmt: skip
    outcome = written or "lease_lost"
    if outcome in ("delivered", "retry", "failed", "lease_lost"):
        metrics.WEBHOOK_ATTEMPTS.labels(outcome).inc()
    _log(member, attempt, outcome, error, delay)
    return outcome


def _log(member: str, attempt: int, outcome: str, error: str | None, delay: float) -> None:
    kind, ident = split_member(member)
    extra = {f"{kind}_id": ident, "attempt": attempt, "callback": outcome, "error": error}
    if outcome == "delivered":
        log.info("webhook delivered", extra=extra)
    elif outcome == "retry":
        log.info("webhook attempt failed; retrying in %.1fs: %s", delay, error, extra=extra)
    elif outcome == "failed":
        log.warning("webhook failed for good: %s", error, extra=extra)
    elif outcome == "lease_lost":
        log.warning("webhook attempt overran its lease; its outcome is not recorded", extra=extra)


def _attempt(hooks: Webhooks, member: str, claim: Claim) -> tuple[str, str | None]:
    """(outcome for settle, error or None) of one POST of the callback's body."""
    kind, ident = split_member(member)
    body_obj = _body(hooks, kind, ident, claim.api_url)
    if body_obj is None:
        return "failed", f"the {kind} record is gone (expired)"
    if kind == "batch" and body_obj["counts"]["pending"]:
        return "unready", None
    secret = hooks.secret(claim.tenant)
    if secret is None:
        return "failed", (f"no signing secret for tenant {claim.tenant!r} "
                          "(DSPY_FLEET_CALLBACK_SECRETS)")  # fmt: skip
    assert claim.url is not None
    try:
        scheme, host, port, addresses = resolve_checked(claim.url, hooks.allow, hooks.resolver)
    except CallbackUrlRefusedError as exc:
        return "failed", exc.message  # never sent: the URL can never be allowed
    except (OSError, UnicodeError) as exc:
        return "retry", _cut(f"cannot resolve the callback host: {exc}")
    body = json.dumps(body_obj, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"dspy-fleet-webhooks/{__version__}",
        signing.DELIVERY_HEADER: delivery_id(member),
        signing.EVENT_HEADER: "prediction" if kind == "job" else "batch",
        **signing.sign(secret, body),
    }
    return _post(hooks, claim.url, addresses, body, headers)


def _body(hooks: Webhooks, kind: str, ident: str, api_url: str | None) -> dict[str, Any] | None:
    """What polling returns for the callback's job or batch (the shared serializer)."""
    if kind == "job":
        job = hooks.jobs.get(ident)
        return None if job is None else prediction_view(job, api_url)
    meta = hooks.batches.meta(ident)
    return None if meta is None else batch_view(hooks.batches, ident, meta, api_url)


def _post(hooks: Webhooks, url: str, addresses: list[IPAddress], body: bytes,
          headers: dict[str, str]) -> tuple[str, str | None]:  # fmt: skip
    """POST to the first checked address that accepts a connection (the name is never
    looked up again), with the URL's host in Host and, for https, in TLS's SNI and the
    certificate check."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    error = "no address"
    for address in addresses:
        shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
        netloc = shown + (f":{parts.port}" if parts.port else "")
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            with hooks.http.stream("POST", target, content=body, extensions=extensions,
                                   headers={**headers, "Host": parts.netloc}) as resp:  # fmt: skip
                status = resp.status_code
        except httpx.ConnectError as exc:
            error = _cut(f"connection to {address} failed: {exc}")
            continue  # the next address, if any
        except httpx.TimeoutException as exc:
            return "retry", _cut(f"timed out ({type(exc).__name__}) after "
                                 f"{hooks.settings.callback_timeout_seconds:g}s")  # fmt: skip
        except httpx.HTTPError as exc:
            return "retry", _cut(f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return "delivered", None
        if 300 <= status < 400:
            return "retry", f"HTTP {status}: redirects are not followed"
        return "retry", f"HTTP {status}"
    return "retry", error


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."
