"""dspy-fleet HTTP API: a thin Flask front end that validates and enqueues prediction jobs.

It never imports dspy or litellm: it talks to workers only through Celery
messages by task name and reads job state from Redis.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dspy_fleet.logs import configure_logging

if TYPE_CHECKING:  # the SDK (dspy_fleet.client) must import without Flask installed
    from flask import Flask

log = logging.getLogger("dspy_fleet.api")


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the API: defaults, then the environment (DSPY_FLEET_*), then ``test_config``."""
    from flask import Flask

    from api import auth, body, errors, limits, metrics, middleware, openapi, rate_limit, services
    from api import batches as batch_store
    from api.routes import (
        batches,
        catalog,
        events,
        feedback,
        predictions,
        system,
        traces,
        usage,
    )
    from api.routes import config as config_routes
    from api.settings import ApiSettings
    from dspy_fleet.fleet_config import load_fleet_config
    from dspy_fleet.settings import check_redelivery_window, load_settings
    from dspy_fleet.store.breakers import read_states
    from dspy_fleet.store.pacing import Pacer, configured_rpm, scopes_for

    overrides = dict(test_config or {})
    settings = load_settings(ApiSettings, **overrides.pop("settings", {}))
    if not overrides.pop("keep_logging", False):
        configure_logging(settings.log_level, service="api")
    config = load_fleet_config(settings.config)
    # Its Celery app's visibility timeout counts too (the shortest on a broker wins).
    check_redelivery_window(settings, config)
    keyring = auth.keyring_from(settings)

    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        STARTED_AT=time.monotonic(),
        JSON_SORT_KEYS=False,
    )
    app.config.update(overrides)
    services.init_app(app, settings, config)
    svc = app.extensions["dspy_fleet"]
    models = list(config.models)
    pacer = Pacer(svc.redis, scopes_for(config))  # read at scrape time only

    def rate_limits() -> dict[str, tuple[float | None, int | None]]:
        return {m: (pacer.effective_rpm(m), configured_rpm(config, m)) for m in models}

    metrics.init_app(app, settings.broker, breaker_states=lambda: read_states(svc.redis, models),
                     rate_limits=rate_limits,
                     sentinel_password=settings.sentinel_secret)  # fmt: skip
    batch_store.init_app(app, settings)
    middleware.init_app(app)
    body.init_app(app)
    auth.init_app(app, keyring)
    # After auth: both limits are per tenant.
    rate_limit.init_app(app, settings, svc.redis)
    limits.init_app(app, settings)
    errors.register_error_handlers(app)
    app.register_blueprint(system.bp)
    app.register_blueprint(predictions.bp)
    app.register_blueprint(feedback.bp)
    app.register_blueprint(traces.bp)
    app.register_blueprint(catalog.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(config_routes.bp)
    log.info("api ready to serve", extra={"env": settings.env, "programs": len(config.programs)})
    return app
