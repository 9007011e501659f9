"""JSON log lines for every process, with the request/job context on each line.

Context travels in a ContextVar, so it follows a request across threads of the
threads pool without leaking between concurrent jobs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# The fields SPEC §5 promises on every line; absent ones are logged as null so
# that log pipelines see one stable schema.
CONTEXT_FIELDS = (
    "request_id",
    "job_id",
    "tenant",
    "program",
    "model",
    "variant",
    "status",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "cache",
)

_context: ContextVar[dict[str, Any] | None] = ContextVar("dspy_fleet_log_context", default=None)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every log line emitted inside the block (nested blocks merge)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_context(**fields: Any) -> Token[dict[str, Any] | None]:
    """Like log_context, for code that cannot use a with-block (request hooks)."""
    return _context.set({**(_context.get() or {}), **fields})


def reset_context(token: Token[dict[str, Any] | None]) -> None:
    """Undo a bind_context."""
    _context.reset(token)


def current_context() -> dict[str, Any]:
    """The fields bound by the enclosing log_context blocks."""
    return dict(_context.get() or {})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


# Record attributes that carry a job's payload (its inputs, outputs, or text that may echo
# them): Celery passes its format context as ``data``; our own lines put an error's message
# (which may quote a provider's answer) in ``error_message``.
PAYLOAD_ATTRS = ("data", "inputs", "outputs", "error_message", "lm_response")
# Keys of Celery's format context that hold payloads: the message's args and kwargs (the
# "received" line), a task's return value (the "succeeded" line), its exception's repr.
_CELERY_PAYLOAD_KEYS = ("args", "kwargs", "return_value")
HIDDEN = "<hidden: DSPY_FLEET_LOG_PAYLOADS=false>"
# Libraries whose messages may quote a job's values (DSPy's warnings quote inputs); their
# lines keep the format string, without the values.
_QUOTING_LOGGERS = ("dspy", "litellm", "LiteLLM")
_EXC_NAME = re.compile(r"^\s*([\w.]+)")
_ERROR_CODE = re.compile(r"""['"]code['"]:\s*['"](\w+)['"]""")


class PayloadFilter(logging.Filter):
    """Keeps job payloads (inputs, outputs, answers quoted in errors) out of log lines.

    Installed unless the operator opts in (DSPY_FLEET_LOG_PAYLOADS=true): prompts are
    customer data and logs go to shared systems. Ids, names and figures stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        for attr in PAYLOAD_ATTRS:
            if attr in record.__dict__:
                delattr(record, attr)
        args = record.args
        if isinstance(args, Mapping) and any(k in args for k in (*_CELERY_PAYLOAD_KEYS, "exc")):
            record.args = _hide_celery_payload(args)
        elif args and record.name.split(".", 1)[0] in _QUOTING_LOGGERS:
            record.msg, record.args = f"{record.msg} {HIDDEN}", None
        return True


def _hide_celery_payload(context: Mapping[str, Any]) -> dict[str, Any]:
    """Celery's format context with its payloads hidden; an exception keeps its type and,
    for a failed job, the error code."""
    shown = {k: (HIDDEN if k in _CELERY_PAYLOAD_KEYS else v) for k, v in context.items()}
    if "exc" in shown:
        text = str(shown["exc"])
        name = _EXC_NAME.match(text)
        code = _ERROR_CODE.search(text)
        shown["exc"] = (name.group(1) if name else "exception") + (
            f"(code={code.group(1)})" if code else ""
        )
    return shown


def json_formatter() -> JsonFormatter:
    """The one formatter: timestamp, level, logger, message, then the context fields."""
    return JsonFormatter(
        "%(timestamp)s %(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
        reserved_attrs=[*JsonFormatter().reserved_attrs, "taskName"],
    )


def configure_logging(
    level: str = "INFO", service: str = "dspy-fleet", *, payloads: bool = False
) -> None:
    """Send every logger of this process to stderr as JSON lines; job payloads are kept out
    of them unless ``payloads`` (DSPY_FLEET_LOG_PAYLOADS) is set."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    handler.addFilter(_ContextFilter())
    if not payloads:
        handler.addFilter(PayloadFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries: their INFO lines repeat what our own lines already say.
    for name in ("LiteLLM", "litellm", "httpx", "httpcore", "urllib3", "dspy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("dspy_fleet").info(
        "logging configured", extra={"service": service, "log_payloads": payloads}
    )
