"""The webhook signature: HMAC-SHA256 over ``timestamp + "." + body``, Stripe's scheme.

A delivery carries ``X-Fleet-Timestamp`` (Unix seconds, the time it was signed) and
``X-Fleet-Signature: v1=<hex>``, the HMAC-SHA256 of the ASCII timestamp, a full stop and
the raw body bytes, keyed with the tenant's secret (DSPY_FLEET_CALLBACK_SECRETS). Signing
the timestamp with the body lets a receiver refuse a replayed delivery: it checks the
signature, then that the timestamp is recent (``tolerance``). As in Stripe's
``Stripe-Signature: t=...,v1=...``, the ``v1=`` prefix names the scheme, and a header may
list several comma-separated signatures (a rotation); any one that matches is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Fleet-Timestamp"
SIGNATURE_HEADER = "X-Fleet-Signature"
# The same for every attempt of one callback: a receiver dedupes on it (README, Webhooks).
DELIVERY_HEADER = "X-Fleet-Delivery-Id"
EVENT_HEADER = "X-Fleet-Event"  # "prediction" or "batch": what the body describes
SCHEME = "v1"
# How old a delivery's timestamp may be when a receiver checks it (seconds), as Stripe's.
DEFAULT_TOLERANCE = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256(secret, f"{timestamp}." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def sign(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers of one delivery of ``body``."""
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``body`` was signed with ``secret`` within ``tolerance`` seconds of ``now``.

    ``headers`` is looked up case-insensitively (any mapping of the request's headers).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not stamp.isdigit():
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > tolerance:
        return False
    expected = signature(secret, int(stamp), body)
    return any(hmac.compare_digest(expected, part.strip()) for part in given.split(","))
