"""API keys and tenants: `Authorization: Bearer <key>`, keys stored only as SHA-256 hashes.

DSPY_FLEET_API_KEYS is a comma-separated list of ``tenant:sha256hex`` entries, with
``:admin`` appended for keys that see every tenant (`dspy-fleet api-key new` makes
one). Keys are random 32-byte tokens, so a plain SHA-256 suffices (no password
stretching needed), and every configured hash is compared in constant time.
With no keys the API runs open, as one tenant, and says so loudly. That tenant's name
(``anonymous``, contract.DEFAULT_TENANT) is reserved: no key may be configured for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from flask import Flask, g, request

from api.settings import ApiSettings
from dspy_fleet.contract import DEFAULT_TENANT
from dspy_fleet.errors import ConfigError, ForbiddenError, UnauthorizedError

log = logging.getLogger("dspy_fleet.api.auth")

_ENTRY = re.compile(r"^(?P<tenant>[\w.:-]{1,64}?):(?P<hash>[0-9a-f]{64})(?P<admin>:admin)?$")
# Paths anyone may call: probes, metrics, the service index and the API docs.
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/static/", "/docs/")


@dataclass(frozen=True)
class Key:
    """One configured key: whose it is, and its hash."""

    tenant: str
    digest: bytes
    admin: bool


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as stored in DSPY_FLEET_API_KEYS."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "dfk_" + secrets.token_urlsafe(32)


def parse_keys(raw: str) -> list[Key]:
    """Parse DSPY_FLEET_API_KEYS; a malformed entry is a ConfigError naming the variable."""
    keys = []
    for i, part in enumerate(p.strip() for p in raw.split(",")):
        if not part:
            continue
        m = _ENTRY.match(part)
        if m is None:
            # Never echo the entry: it might be a raw key pasted by mistake.
            raise ConfigError(
                f"DSPY_FLEET_API_KEYS: entry {i + 1} is not 'tenant:<64 hex sha256>[:admin]'"
            )
        if m["tenant"].lower() == DEFAULT_TENANT:
            # Jobs without a tenant (open mode, direct producers) belong to this name: a
            # key for it would see every one of them.
            raise ConfigError(
                f"DSPY_FLEET_API_KEYS: entry {i + 1} uses the reserved tenant name "
                f"{DEFAULT_TENANT!r} (it owns every job submitted without a tenant); "
                "choose another tenant name"
            )
        keys.append(Key(m["tenant"], bytes.fromhex(m["hash"]), m["admin"] is not None))
    return keys


def keyring_from(settings: ApiSettings) -> KeyRing:
    """The key ring of these settings; production mode without keys is a ConfigError."""
    ring = KeyRing(parse_keys(settings.api_keys.get_secret_value()))
    if ring.open and settings.env == "production":
        raise ConfigError(
            "DSPY_FLEET_API_KEYS: production mode (DSPY_FLEET_ENV=production) refuses to run "
            "without API keys; create one with `dspy-fleet api-key new --tenant NAME`"
        )
    return ring


class KeyRing:
    """The configured keys; finds the tenant of a presented key in constant time."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    @property
    def open(self) -> bool:
        """True when no keys are configured: everyone is the one default tenant."""
        return not self.keys

    def lookup(self, presented: str) -> Key | None:
        """The key entry matching ``presented``; compares against every entry, always."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def init_app(app: Flask, keyring: KeyRing) -> None:
    """Authenticate every non-public request; set g.tenant, g.is_admin and g.tenant_filter."""
    app.extensions["dspy_fleet_auth"] = keyring
    if keyring.open:
        log.warning(
            "NO API KEYS CONFIGURED: the API is open to anyone who can reach it "
            "(set DSPY_FLEET_API_KEYS; production mode refuses to start like this)"
        )

    @app.before_request
    def _authenticate() -> None:
        if keyring.open:
            g.tenant, g.is_admin, g.tenant_filter = DEFAULT_TENANT, True, None
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        key = keyring.lookup(token.strip()) if scheme.lower() == "bearer" and token else None
        if key is None:
            if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
                g.tenant, g.is_admin, g.tenant_filter = None, False, None
                return
            raise UnauthorizedError(
                "missing or invalid API key: send 'Authorization: Bearer <key>'"
                if header else "this endpoint needs an API key: 'Authorization: Bearer <key>'"
            )  # fmt: skip
        g.tenant, g.is_admin = key.tenant, key.admin
        # Admins see every tenant; everyone else only their own.
        g.tenant_filter = None if key.admin else key.tenant


def visible(owner: str | None) -> bool:
    """Whether the current caller may see something that belongs to ``owner``."""
    return bool(g.get("is_admin")) or (owner or DEFAULT_TENANT) == g.get("tenant")


def require_admin() -> None:
    """403 unless the caller is an admin (or the API runs open)."""
    if not g.get("is_admin"):
        raise ForbiddenError("this endpoint is for admin keys only")
