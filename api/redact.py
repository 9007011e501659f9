"""Redaction of secrets for anything the service shows about itself (/config, logs)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Keys whose values are secret wherever they appear in config (headers, kwargs).
_SECRET_KEY = re.compile(r"(key|token|secret|password|passwd|authorization|cookie|credential)",
                         re.IGNORECASE)  # fmt: skip


def redact_url(url: str | None) -> str | None:
    """A URL with its password (and a user-only credential) masked."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    creds = f"{user}:{MASK}" if parts.password is not None else MASK
    return urlunsplit(parts._replace(netloc=f"{creds}@{host}"))


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secret-looking keys masked and URL credentials hidden."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key.endswith("_env"):
        return value  # the *name* of a variable holding a secret, not the secret
    if _SECRET_KEY.search(key) and value not in (None, "", {}, []):
        return MASK
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
