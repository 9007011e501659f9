"""JSON log lines for every process, with the request/job context on each line.

Context travels in a ContextVar, so it follows a request across threads of the
threads pool without leaking between concurrent jobs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
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


def json_formatter() -> JsonFormatter:
    """The one formatter: timestamp, level, logger, message, then the context fields."""
    return JsonFormatter(
        "%(timestamp)s %(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
        reserved_attrs=[*JsonFormatter().reserved_attrs, "taskName"],
    )


def configure_logging(level: str = "INFO", service: str = "dspy-fleet") -> None:
    """Send every logger of this process to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries: their INFO lines repeat what our own lines already say.
    for name in ("LiteLLM", "litellm", "httpx", "httpcore", "urllib3", "dspy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("dspy_fleet").info("logging configured", extra={"service": service})
