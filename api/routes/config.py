"""GET /config: the effective configuration, every secret redacted (admin only)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from api.auth import require_admin
from api.redact import redact
from api.services import services

bp = Blueprint("config", __name__)


@bp.get("/config")
def config() -> Response:
    """Settings and models/programs as this API process loaded them; secrets masked."""
    require_admin()
    svc = services()
    keyring = current_app.extensions["dspy_fleet_auth"]
    settings = svc.settings.model_dump(mode="json", exclude={"api_keys"})
    auth = {"mode": "open" if keyring.open else "api_keys",
            "tenants": sorted({k.tenant for k in keyring.keys}),
            "admin_tenants": sorted({k.tenant for k in keyring.keys if k.admin})}  # fmt: skip
    if keyring.open:
        auth["warning"] = ("no API keys configured: anyone who can reach this API can use it "
                           "and see every prediction and cost")  # fmt: skip
    return jsonify({
        "env": svc.settings.env,
        "auth": auth,
        "settings": redact(settings),
        "fleet": redact(svc.config.model_dump(mode="json")),
    })  # fmt: skip
