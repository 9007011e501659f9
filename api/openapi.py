"""GET /openapi.json (OpenAPI 3.1, schemas generated from the pydantic models) and GET /docs.

Only the operations table below is written by hand: which endpoint answers what,
with which model. Every schema comes from ``model_json_schema`` of the models the
API really validates and answers with, and only routes the app has registered
are listed, so the document cannot describe an endpoint that does not exist.
/docs is Swagger UI served from ``api/static/swagger-ui`` (no CDN: the service
often runs without internet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, url_for
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dspy_fleet import __version__ as VERSION
from dspy_fleet import schemas
from dspy_fleet.contract import BatchItem, PredictRequest

bp = Blueprint("docs", __name__)

REF = "#/components/schemas/{model}"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Op:
    """One documented operation: responses map a status to (description, model or media)."""

    method: str
    rule: str  # the Flask rule, e.g. /v1/predictions/<job_id>
    summary: str
    tag: str
    responses: dict[str, tuple[str, Any]]
    body: type[BaseModel] | None = None
    params: list[dict[str, Any]] = field(default_factory=list)
    public: bool = False


def _path_param(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": what,
            "schema": {"type": "string", "minLength": 1}}  # fmt: skip


def _query(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": what, "schema": schema}


JOB_ID = _path_param("job_id", "The prediction's id.")
BATCH_ID = _path_param("batch_id", "The batch's id.")
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Names the batch: the same key and items again (a retry) give the same "
                   "batch and job ids, so no item runs or bills twice; missing items are added.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}  # fmt: skip
# Printable ASCII (an IDN host in its punycode form): percent-encoded, 2,048 characters of it
# fit gunicorn's request-line limit (8,190 bytes, its maximum), where 2,048 characters of any
# Unicode could take 24 KB and be refused by gunicorn itself, outside the JSON error format.
CALLBACK_URL = _query(
    "callback_url",
    {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": "^[!-~]+$"},
    "Webhook called once when the batch ends, with the batch object (README, Webhooks): an "
    "absolute http(s) URL without credentials, the same rules as an item's `callback_url`, in "
    "printable ASCII (a query string is limited to about 8 KB).",
)
CALLBACK_ITEMS = _query(
    "callback_items",
    {"type": "boolean", "default": False},
    "Also call `callback_url` as each item ends, with its prediction (items with a "
    "callback_url of their own use theirs).",
)
OBJ = {"type": "object"}
E = schemas.ErrorResponse
TRACE_FILTERS = [
    _query("since", {"type": "string", "maxLength": 40},
           "Kept since: a date or ISO 8601 time (default: every kept trace)."),
    _query("variant", {"type": "string", "maxLength": 64},
           "Only this variant's jobs (`none`: jobs without one)."),
    _query("version", {"type": "string", "maxLength": 64}, "Only this program version."),
]  # fmt: skip
SSE = "text/event-stream"


def _last_event_id(pattern: str, what: str) -> dict[str, Any]:
    return {"name": "Last-Event-ID", "in": "header", "required": False,
            "description": f"Resume after this event: {what}",
            "schema": {"type": "string", "pattern": pattern}}  # fmt: skip


JOB_EVENT_ID = _last_event_id(
    r"^[0-9]{1,9}$",
    "the `id` of an event this prediction's stream sent (its number in the job's log: 1, 2, "
    "...). Only the events after it are sent.",
)
BATCH_EVENT_ID = _last_event_id(
    r"^[a-z_]{1,20}(\.[0-9]{1,9}){5}$",
    "the `id` of an event this batch's stream sent (it names a snapshot of the counts). The "
    "current snapshot is sent only if it differs.",
)
STREAM_ERRORS = {
    "422": ("`Last-Event-ID` is not an id this stream sends.", E),
    "429": ("Over the process's or the tenant's cap of held requests (`rate_limited`); "
            "retry after `Retry-After`.", E),
}  # fmt: skip

OPERATIONS: list[Op] = [
    Op("get", "/", "Service name, version and links", "service", {"200": ("Links.", OBJ)},
       public=True),
    Op("get", "/health", "Liveness: the process answers (checks nothing external)", "service",
       {"200": ("Alive.", OBJ)}, public=True),
    Op("get", "/ready", "Readiness: Redis, live workers for every queue, config", "service",
       {"200": ("Ready.", OBJ), "503": ("Not ready; the failing components are named.", E)},
       public=True),
    Op("get", "/metrics", "Prometheus metrics of this API", "service",
       {"200": ("Prometheus text format.", "text/plain")}, public=True),
    Op("get", "/config", "Effective configuration, secrets redacted", "service",
       {"200": ("The configuration.", OBJ)}),
    Op("get", "/openapi.json", "This document", "service",
       {"200": ("OpenAPI 3.1 document.", OBJ)}, public=True),
    Op("get", "/docs", "Interactive API documentation (Swagger UI)", "service",
       {"200": ("HTML page.", "text/html")}, public=True),
    Op("post", "/v1/predict", "Submit one prediction", "predictions",
       {"200": ("Finished within `wait`, or served from cache.", schemas.Prediction),
        "202": ("Queued; poll `status_url`.", schemas.Prediction),
        "400": ("The body is not JSON.", E),
        "404": ("Unknown program, model or variant.", E),
        "413": ("Body over the size limit.", E),
        "422": ("The body breaks the schema; `details.errors` names the fields; or "
                "`callback_url` is refused by the SSRF guard (`callback_url_refused`).", E),
        "429": ("`quota_exceeded`: a tenant quota is used up (`details.quota`); nothing "
                "was queued. `Retry-After`: seconds until it resets.", E),
        "503": ("The queue is unavailable; the job was not accepted.", E)},
       body=PredictRequest),
    Op("get", "/v1/predictions/<job_id>", "A prediction's status and result", "predictions",
       {"200": ("The prediction.", schemas.Prediction),
        "404": ("No such prediction (or another tenant's).", E),
        "422": ("`wait` out of range.", E)},
       params=[JOB_ID, _query("wait", {"type": "number", "minimum": 0, "maximum": 60},
                              "Long-poll: seconds to wait for the job to end.")]),
    Op("get", "/v1/predictions/<job_id>/events", "A prediction's events (Server-Sent Events)",
       "predictions",
       {"200": ("`text/event-stream`: `status` events (data `{id, status, at, attempt?, "
                "retry_in_seconds?, error?, throttled_until?, throttle_reason?}`) at each "
                "status change, then one `result` event whose data is the prediction as GET "
                "returns it, and the stream ends. Each event's `id` resumes after it "
                "(`Last-Event-ID`); `: keep-alive` comments while nothing happens; the server "
                "closes a stream after DSPY_FLEET_EVENTS_MAX_SECONDS (reconnect and resume).",
                SSE),
        "404": ("No such prediction (or another tenant's).", E), **STREAM_ERRORS},
       params=[JOB_ID, JOB_EVENT_ID]),
    Op("delete", "/v1/predictions/<job_id>", "Cancel a queued prediction", "predictions",
       {"200": ("Cancelled: it will not run.", schemas.Prediction),
        "404": ("No such prediction.", E),
        "409": ("Already running or ended (`not_cancellable`); running jobs finish.", E)},
       params=[JOB_ID]),
    Op("post", "/v1/predictions/<job_id>/feedback", "Judge a prediction", "predictions",
       {"200": ("Replaced this source's earlier feedback (`replaced: true`).",
                schemas.Feedback),
        "201": ("Stored.", schemas.Feedback),
        "400": ("The body is not JSON.", E),
        "404": ("No such prediction (or another tenant's).", E),
        "409": ("`not_succeeded`: the prediction has not succeeded (`details.status`); "
                "nothing was stored.", E),
        "413": ("Body over the size limit.", E),
        "422": ("The body breaks the schema; `details.errors` names the fields.", E)},
       body=schemas.FeedbackRequest, params=[JOB_ID]),
    Op("get", "/v1/predictions/<job_id>/feedback", "A prediction's feedback", "predictions",
       {"200": ("Every source's feedback.", schemas.FeedbackList),
        "404": ("No such prediction (or another tenant's).", E)},
       params=[JOB_ID]),
    Op("post", "/v1/batches", "Submit a batch of predictions", "batches",
       {"202": ("Accepted; invalid items and items Redis refused are listed in `errors` "
                "(they never run); `accepted`/`rejected` name the items by custom_id.",
                schemas.BatchCreated),
        "400": ("The body is not JSON.", E),
        "413": ("Body over the size limit.", E),
        "422": ("Not an array, empty, or more items than allowed; or the Idempotency-Key "
                "was used before with other items (`idempotency_key_reused`); or the "
                "batch's `callback_url` is refused (`callback_url_refused`).", E),
        "429": ("`quota_exceeded`: the items would pass a tenant quota (`details.quota`); "
                "none was queued. `Retry-After`: seconds until it resets.", E),
        "503": ("Redis is unavailable; no item was accepted (with an Idempotency-Key, "
                "`details.batch_id` names the batch to retry).", E)},
       body=BatchItem, params=[IDEMPOTENCY_KEY, CALLBACK_URL, CALLBACK_ITEMS]),
    Op("get", "/v1/batches/<batch_id>", "A batch's status and counts", "batches",
       {"200": ("The batch.", schemas.Batch), "404": ("No such batch.", E)},
       params=[BATCH_ID]),
    Op("get", "/v1/batches/<batch_id>/results", "Results of a batch, NDJSON by custom_id",
       "batches",
       {"200": ("One JSON line per item that has ended.", (NDJSON, schemas.BatchResultLine)),
        "404": ("No such batch.", E)},
       params=[BATCH_ID]),
    Op("get", "/v1/batches/<batch_id>/events", "A batch's progress (Server-Sent Events)",
       "batches",
       {"200": ("`text/event-stream`: a `progress` event (data `{id, status, counts}`) each "
                "time the counts change, then one `result` event whose data is the batch "
                "object once it has ended, and the stream ends. Resumable and bounded like a "
                "prediction's stream.", SSE),
        "404": ("No such batch.", E), **STREAM_ERRORS},
       params=[BATCH_ID, BATCH_EVENT_ID]),
    Op("post", "/v1/batches/<batch_id>/cancel", "Cancel a batch", "batches",
       {"200": ("Queued items are cancelled; running ones finish.", schemas.Batch),
        "404": ("No such batch.", E)},
       params=[BATCH_ID]),
    Op("delete", "/v1/batches/<batch_id>", "Cancel a batch (same as POST …/cancel)", "batches",
       {"200": ("Queued items are cancelled; running ones finish.", schemas.Batch),
        "404": ("No such batch.", E)},
       params=[BATCH_ID]),
    Op("get", "/v1/programs", "Registered programs and models", "catalog",
       {"200": ("Programs with their fields and variants, and models.", OBJ)}),
    Op("get", "/v1/programs/<program>/report", "A/B report of a program's variants",
       "catalog",
       {"200": ("Per variant: n, success rate, latency p50/p95, cost per request, feedback "
                "n and mean score; per variant against the control: tests, p-values and a "
                "`verdict` line (README, A/B report). A tenant's own jobs only.", OBJ),
        "404": ("Unknown program (`unknown_program`).", E),
        "422": ("Bad `since`, `control` or `source`.", E)},
       params=[_path_param("program", "The program's name."),
               _query("since", {"type": "string", "maxLength": 40},
                      "Jobs finished since: a date or ISO 8601 time (UTC unless it says); "
                      "default 7 days ago, at most 30 days back (the retention)."),
               _query("control", {"type": "string", "maxLength": 64},
                      "The variant the others are compared with (default: first by name)."),
               _query("source", {"type": "string", "maxLength": 64},
                      "Only this source's feedback (default: every source's)."),
               _query("version", {"type": "string", "maxLength": 64},
                      "Only jobs that ran this program version (GET /v1/programs).")]),
    Op("get", "/v1/programs/<program>/traces", "A program's kept traces", "catalog",
       {"200": ("`{program, count, traces}`: the newest kept traces, newest first, each with "
                "inputs, outputs, `lm_calls` (messages and answers), variant, "
                "`program_version` and its `feedback` (README, Traces and examples). A "
                "tenant's own jobs only.", OBJ),
        "404": ("Unknown program (`unknown_program`).", E),
        "422": ("Bad `since`, `variant`, `version` or `limit`.", E)},
       params=[_path_param("program", "The program's name."), *TRACE_FILTERS,
               _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                      "At most this many traces (default 100).")]),
    Op("get", "/v1/programs/<program>/examples", "A program's kept traces as DSPy examples",
       "catalog",
       {"200": ("One JSON object a line (`application/x-ndjson`): the input and output "
                "fields (feedback's `expected` where given), `dspy_score` and `dspy_fleet` "
                "metadata; `dspy.Example(**record).with_inputs(*fields)` loads each, the "
                "header `X-Input-Fields` naming the fields. A tenant's own jobs only.",
                NDJSON),
        "404": ("Unknown program (`unknown_program`).", E),
        "422": ("Bad `since`, `variant`, `version` or `min_score`.", E)},
       params=[_path_param("program", "The program's name."), *TRACE_FILTERS,
               _query("min_score", {"type": "number", "minimum": 0, "maximum": 1},
                      "Only examples whose mean feedback score is at least this.")]),
    Op("get", "/v1/predictions/<job_id>/trace", "A prediction's kept trace", "predictions",
       {"200": ("The trace, with its `feedback`.", OBJ),
        "404": ("No trace kept for it (not sampled, no feedback, expired), or no such "
                "prediction.", E)},
       params=[JOB_ID]),
    Op("get", "/costs", "Fleet-wide cost and token totals", "catalog",
       {"200": ("Totals and breakdowns; each tenant entry with its `limits`, and `budgets`: "
                "each tenant's usage against them (as GET /v1/usage).", OBJ),
        "422": ("Bad date range.", E)},
       params=[_query("since", {"type": "string", "format": "date"}, "First day (UTC)."),
               _query("until", {"type": "string", "format": "date"}, "Last day (UTC).")]),
    Op("get", "/v1/usage", "The caller's usage against its quotas and budget", "catalog",
       {"200": ("Requests and tokens today, USD this month, each with its limit (null: "
                "unlimited) and reset time; with `all=true`, `{tenants: {name: usage}}`.",
                schemas.UsageAnswer),
        "403": ("Another tenant's usage, asked without an admin key.", E),
        "422": ("`all` is not true or false.", E)},
       params=[_query("tenant", {"type": "string"}, "Admin only: this tenant's usage."),
               _query("all", {"type": "boolean"}, "Admin only: every tenant's usage.")]),
]  # fmt: skip

BODY_MODELS: list[type[BaseModel]] = [PredictRequest, BatchItem, schemas.FeedbackRequest]
RESPONSE_MODELS: list[type[BaseModel]] = [
    schemas.ErrorResponse, schemas.Prediction, schemas.Batch, schemas.BatchCreated,
    schemas.BatchResultLine, schemas.UsageAnswer, schemas.Feedback, schemas.FeedbackList,
]  # fmt: skip


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def _registered(app: Flask) -> set[tuple[str, str]]:
    return {(m.lower(), r.rule) for r in app.url_map.iter_rules() for m in r.methods or ()}


def _content(target: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(target, str):
        return {target: {"schema": {"type": "string"}}}
    if isinstance(target, tuple):
        media, model = target
        return {media: {"schema": refs[(model, "serialization")]}}
    if isinstance(target, dict):
        return {"application/json": {"schema": target}}
    return {"application/json": {"schema": refs[(target, "serialization")]}}


def _operation_id(op: Op) -> str:
    words = re.sub(r"\W+", "_", op.rule).strip("_") or "index"
    return f"{op.method}_{words}"


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app's registered routes."""
    key_map, defs = models_json_schema(
        [(m, "validation") for m in BODY_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS],
        ref_template=REF,
    )
    refs: dict[Any, dict[str, Any]] = dict(key_map)
    error = refs[(schemas.ErrorResponse, "serialization")]
    registered = _registered(app)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if (op.method, op.rule) not in registered:
            continue
        responses = {
            status: {"description": desc, "content": _content(target, refs)}
            for status, (desc, target) in op.responses.items()
        }
        # Any other failure (401/403 with API keys, 405, 429, 503 when Redis is down,
        # 500) still has the one error shape.
        responses["default"] = {"description": "Any other error, in the one error shape.",
                                "content": {"application/json": {"schema": error}}}  # fmt: skip
        operation: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
            "responses": responses,
        }
        if op.params:
            operation["parameters"] = op.params
        if op.body is BatchItem:
            item = refs[(BatchItem, "validation")]
            operation["requestBody"] = {
                "required": True,
                "description": "A JSON array of items, or NDJSON with one item per line.",
                "content": {
                    # Any array is accepted: items that do not match BatchItem are
                    # reported one by one in the answer's `errors`, never the whole batch.
                    "application/json": {"schema": {"type": "array", "minItems": 1,
                                                    "items": {"anyOf": [item, {}]}}},
                    NDJSON: {"schema": item},
                },
            }  # fmt: skip
        elif op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
            }
        if not op.public:
            # Optional until API keys are configured ({} = no credentials needed).
            operation["security"] = [{"bearerAuth": []}, {}]
        paths.setdefault(_openapi_path(op.rule), {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dspy-fleet",
            "version": VERSION,
            "description": "Run DSPy programs as a service. Every error has the body "
            '`{"error": {"code", "message", "details", "request_id"}}`.',
        },
        "tags": [{"name": t} for t in ("predictions", "batches", "catalog", "service")],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI document, generated from the pydantic models (built once per process)."""
    doc = current_app.extensions.get("dspy_fleet_openapi")
    if doc is None:
        doc = current_app.extensions["dspy_fleet_openapi"] = build_document(current_app)
    return jsonify(doc)


_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>dspy-fleet API</title>
  <link rel="icon" type="image/png" href="{icon}">
  <link rel="stylesheet" href="{css}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{js}"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "{spec}", dom_id: "#swagger-ui", deepLinking: true,
      validatorUrl: null, docExpansion: "list", defaultModelsExpandDepth: 0
    }});
  </script>
</body>
</html>
"""


@bp.get("/docs")
def docs() -> Response:
    """Swagger UI for /openapi.json; every asset comes from this server."""

    def asset(name: str) -> str:
        return url_for("static", filename=f"swagger-ui/{name}")

    page = _PAGE.format(
        icon=asset("favicon-32x32.png"),
        css=asset("swagger-ui.css"),
        js=asset("swagger-ui-bundle.js"),
        spec=url_for("docs.openapi_json"),
    )
    return Response(page, mimetype="text/html")
