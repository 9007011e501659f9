"""Trace capture: what a program did on one job (inputs, outputs, each LM call's messages
and answer, variant, program version), redacted and handed to the finish script.

Which jobs: a share ``sample_rate`` of each program's jobs is kept at once; with
``keep_on_feedback`` every other job's trace is parked for ``feedback_window_hours``, and
a feedback post on the job keeps it (dspy_fleet/store/traces.py). The LM calls are heard
by a DSPy LM callback scoped to the job (``dspy.context(dspy_fleet_lm_callbacks=...)`` in
worker/predict.py), not read from ``lm.history``: one LM object serves many jobs at once
in a worker. Traces never go to the logs: nothing here logs a value.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from dspy.utils.callback import BaseCallback

from dspy_fleet.contract import JobMessage, utcnow
from dspy_fleet.errors import ConfigError
from dspy_fleet.fleet_config import TraceConfig
from dspy_fleet.plan import Plan
from dspy_fleet.store.traces import finish_fields
from worker import metrics
from worker.programs import LoadedProgram, import_path

log = logging.getLogger("dspy_fleet.worker")
REDACTED = "[redacted]"

# The recorder of the job this thread (or greenlet) runs, if its trace is captured.
CURRENT: ContextVar[Recorder | None] = ContextVar("dspy_fleet_trace", default=None)


class Recorder(BaseCallback):
    """Hears one job's LM calls: the messages sent and the answers (or the error's type)."""

    def __init__(self, cfg: TraceConfig, sampled: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.sampled = sampled
        self.calls: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """Note the call's messages (or prompt) and the model it went to."""
        self._open[call_id] = {
            "model": getattr(instance, "model", None),
            "messages": inputs.get("messages") or inputs.get("prompt"),
        }

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        """Note the call's answer, or the type of the error it raised."""
        entry = self._open.pop(call_id, {"model": None, "messages": None})
        entry["outputs"] = outputs
        if exception is not None:
            entry["error"] = type(exception).__name__
        self.calls.append(entry)


def begin(cfg: TraceConfig) -> Recorder | None:
    """A recorder for a job of a program traced by ``cfg``, or None when its trace is not
    captured (not sampled, and no feedback would keep it)."""
    sampled = cfg.sample_rate >= 1 or (cfg.sample_rate > 0 and random.random() < cfg.sample_rate)
    if not sampled and not cfg.keep_on_feedback:
        return None
    return Recorder(cfg, sampled)


def _safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _same(value: Any) -> Any:
    return value


def _forms(value: Any) -> list[str]:
    """How a field's value may appear inside a prompt or an answer."""
    if value is None or value == "":
        return []
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    forms = {text, str(value)}
    return sorted((f for f in forms if f), key=len, reverse=True)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    return value


def redact(doc: dict[str, Any], sensitive: list[str]) -> dict[str, Any]:
    """``doc`` with the values of the ``sensitive`` input and output fields replaced by
    [redacted], there and wherever they occur in the LM calls' messages and answers."""
    names = set(sensitive)
    hidden = sorted(names & (set(doc["inputs"]) | set(doc["outputs"])))
    if not hidden:
        return doc
    secrets: list[str] = []
    for part in ("inputs", "outputs"):
        for name in hidden:
            if name in doc[part]:
                secrets += _forms(doc[part][name])
                doc[part][name] = REDACTED
    secrets = sorted(set(secrets), key=len, reverse=True)
    doc["lm_calls"] = _scrub(doc["lm_calls"], secrets)
    doc["redacted"] = hidden
    return doc


_hooks: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _hook(path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if path not in _hooks:
        fn = import_path(path, "traces.redact")
        if not callable(fn):
            raise ConfigError(f"traces.redact: {path!r} is not callable")
        _hooks[path] = fn
    return _hooks[path]


def encode(doc: dict[str, Any], max_bytes: int) -> tuple[str | None, bool]:
    """The trace's JSON within ``max_bytes`` (the LM calls' text dropped if need be,
    ``truncated`` set), or None when even that is too large; and whether it was cut."""
    text = json.dumps(doc, separators=(",", ":"), default=str)
    if len(text.encode()) <= max_bytes:
        return text, False
    doc["lm_calls"] = [{"model": c.get("model"), "error": c.get("error")} for c in doc["lm_calls"]]
    doc["truncated"] = True
    text = json.dumps(doc, separators=(",", ":"), default=str)
    return (text, True) if len(text.encode()) <= max_bytes else (None, True)


_file_lock = threading.Lock()


def _append(path: Path, text: str) -> None:
    with _file_lock, path.open("a", encoding="utf-8") as out:
        out.write(text + "\n")


def fields(
    recorder: Recorder,
    msg: JobMessage,
    plan: Plan,
    program: LoadedProgram,
    *,
    status: str,
    model: str,
    outputs: dict[str, Any] | None,
    cached: bool,
    error_code: str | None = None,
) -> dict[str, str]:
    """The job-hash fields that hand the job's trace to the finish script
    (store/traces.py :func:`finish_fields`); empty when it is dropped (too large, or the
    redaction hook failed). Counts the outcome in dspy_fleet_traces_total."""
    cfg = recorder.cfg
    # Redaction edits the document in place: it gets its own copy of the values. Without
    # it, nothing edits them and encode() serializes them as they are (half the work).
    copy = _safe if cfg.sensitive_fields or cfg.redact is not None else _same
    doc: dict[str, Any] = {
        "job_id": msg.job_id, "program": plan.program, "variant": plan.variant,
        "program_version": program.version, "tenant": msg.tenant, "model": model,
        "status": status, "error_code": error_code,
        "finished_at": utcnow().isoformat().replace("+00:00", "Z"),
        "inputs": copy(plan.inputs or {}), "outputs": copy(outputs or {}),
        "input_fields": list(program.input_fields),
        "output_fields": list(program.output_fields), "cached": cached,
        "lm_calls": copy(recorder.calls), "truncated": False, "redacted": [],
    }  # fmt: skip
    doc = redact(doc, cfg.sensitive_fields)
    if cfg.redact is not None:
        try:
            doc = _hook(cfg.redact)(doc)
        except Exception as exc:  # a broken hook must not fail the job, nor leak the trace
            log.warning("the trace redaction hook failed (%s); trace dropped", type(exc).__name__)
            metrics.TRACES.labels(plan.program, "dropped").inc()
            return {}
    text, cut = encode(doc, cfg.max_trace_bytes)
    if text is None:
        metrics.TRACES.labels(plan.program, "dropped").inc()
        return {}
    if cut:
        metrics.TRACES.labels(plan.program, "truncated").inc()
    metrics.TRACES.labels(plan.program, "kept" if recorder.sampled else "pending").inc()
    if recorder.sampled and cfg.file is not None:
        try:
            _append(cfg.file, text)
        except OSError as exc:
            log.warning("could not append a trace to the traces file: %s", exc.strerror)
    return finish_fields(
        text, keep=recorder.sampled, ttl_seconds=int(cfg.ttl_days * 86400),
        cap=cfg.max_traces, window_seconds=int(cfg.feedback_window_hours * 3600),
    )  # fmt: skip
