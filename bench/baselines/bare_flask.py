"""A bare Flask app: enqueue with ``send_task`` only, one Redis GET, or enqueue and wait.

Served by gunicorn with our API's settings (``-c python:api.gunicorn_conf``), against
the bare Celery app's broker (``DSPY_FLEET_REDIS_URL``).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import redis
from celery import Celery
from flask import Flask, Response, jsonify, request

from dspy_fleet.broker.celery_config import celery_config
from dspy_fleet.settings import CommonSettings, load_settings

RESULT_PREFIX = "celery-task-meta-"

if os.environ.get("BENCH_BARE_KOMBU_PATCH") == "1":
    # Like-for-like runs: the bare side gets our kombu fix too (dspy_fleet/broker/kombu_patch.py).
    from dspy_fleet.broker import kombu_patch

    kombu_patch.install()


def create_app() -> Flask:
    """The bare app: /enqueue, /get and /wait (and /health, for the stack's start-up)."""
    settings = load_settings(CommonSettings)
    celery = Celery("bare", set_as_current=False)
    celery.conf.update(celery_config(settings))
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    get_key = os.environ.get("BENCH_GET_KEY", "bench:cached")
    app = Flask(__name__)

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok"})

    @app.post("/enqueue")
    def enqueue() -> tuple[Response, int]:
        body = request.get_json(force=True)
        result = celery.send_task("bare.predict", kwargs={"question": body["input"]})
        return jsonify({"id": result.id, "status": "queued"}), 202

    @app.get("/get")
    def get() -> Response:
        return Response(client.get(get_key) or "null", mimetype="application/json")

    @app.post("/wait")
    def wait() -> tuple[Response, int]:
        # Subscribed before sending, so the result cannot be published unseen; the result
        # backend publishes every state it stores on the task's key.
        body = request.get_json(force=True)
        task_id = str(uuid.uuid4())
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(RESULT_PREFIX + task_id)
        try:
            celery.send_task(body.get("task", "bare.predict"), task_id=task_id,
                             kwargs={"question": body["input"]})  # fmt: skip
            deadline = time.monotonic() + float(body.get("wait", 10))
            while time.monotonic() < deadline:
                msg = pubsub.get_message(timeout=deadline - time.monotonic())
                if msg and msg["type"] == "message":
                    meta = json.loads(msg["data"])
                    if meta["status"] in ("SUCCESS", "FAILURE"):
                        return jsonify(
                            {"id": task_id, "status": meta["status"], "result": meta["result"]}
                        ), 200
        finally:
            pubsub.close()
        return jsonify({"id": task_id, "status": "pending"}), 202

    return app
