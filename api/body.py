"""Request bodies: the size limit for chunked bodies too, and a bound on JSON nesting.

Size: werkzeug enforces MAX_CONTENT_LENGTH on a chunked body (no Content-Length) by
silently cutting it at the limit, so an oversized body became truncated JSON and a 400.
:func:`init_app` makes such a body a 413 like any other over the limit.

Nesting, checked on the raw bytes before anything parses them: Python's json module,
pydantic and every later step (build_message, the cache key, the result's JSON) recurse
once per level: a 20 kB body of ``[[[[...`` reaches the
interpreter's recursion limit (~900 levels through the validators) and used to answer 500.
No real request needs more than a few levels, so the body is refused before parsing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import IO, Any

from flask import Flask

from dspy_fleet.errors import PayloadTooLargeError, RequestValidationError

# Levels a JSON body (or one NDJSON line) may nest: the body object is level 1, its
# ``inputs`` level 2, so inputs keep 62 levels for values of their own. Far below where
# anything recurses too deep (~900), far above what a prompt's structured input needs.
MAX_JSON_DEPTH = 64

# How long an oversized chunked body is read on (and thrown away) before the 413.
_DRAIN_SECONDS = 2.0

# A JSON string, escapes included (unrolled so the regex engine never backtracks).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """How deep the brackets of ``raw`` nest, strings skipped; a linear scan at C speed
    (regex and bytes.translate) except for one step per bracket."""
    if not raw:
        return 0
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(accumulate(_STEP[b] for b in brackets)))


def check_depth(raw: bytes, *, lines: bool = False) -> None:
    """Refuse (422) a body nested deeper than MAX_JSON_DEPTH; ``lines``: each NDJSON line
    counts on its own (a JSON string cannot hold a raw newline, so lines never share one)."""
    depth = (
        max((json_depth(line) for line in raw.splitlines()), default=0)
        if lines
        else json_depth(raw)
    )
    if depth > MAX_JSON_DEPTH:
        raise RequestValidationError(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels",
            details={
                "errors": [{"field": "(body)", "message": f"nested {depth} levels deep"}],
                "max_depth": MAX_JSON_DEPTH,
            },
        )


def too_large(limit: int) -> PayloadTooLargeError:
    """The 413 of a body over ``limit`` bytes (the same words whichever way it was sent)."""
    return PayloadTooLargeError(
        f"request body is larger than the limit of {limit} bytes", details={"limit_bytes": limit}
    )


class CappedInput:
    """A chunked body's input stream: more than ``limit`` bytes is a 413.

    werkzeug reads at most ``limit`` bytes of it; when it has read exactly that many,
    one more byte is peeked from the connection: any at all means the body is over."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._seen = 0

    def _count(self, data: bytes) -> bytes:
        self._seen += len(data)
        if self._seen > self._limit or (data and self._seen == self._limit and self._raw.read(1)):
            self._drain()
            raise too_large(self._limit)
        return data

    def _drain(self) -> None:
        # A client still sending when the connection closes may never read the 413
        # (gunicorn drains only 64 kB of an unread body, then closes and the peer sees a
        # reset). Reading up to one more limit's worth, briefly, lets a body that is over
        # by less than that get its answer; a larger one may still see the reset.
        deadline = time.monotonic() + _DRAIN_SECONDS
        left = self._limit
        while left > 0 and time.monotonic() < deadline:
            chunk = self._raw.read(min(65_536, left))
            if not chunk:
                return
            left -= len(chunk)

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all when negative), counted against the limit."""
        return self._count(self._raw.read(-1 if size is None else size))

    def readline(self, size: int | None = -1) -> bytes:
        """One line, counted against the limit."""
        return self._count(self._raw.readline(-1 if size is None else size))


def init_app(app: Flask) -> None:
    """Wrap the WSGI input of bodies without a Content-Length (chunked) in CappedInput."""
    inner = app.wsgi_app

    def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        # With a Content-Length werkzeug answers 413 itself, before reading anything.
        if limit is not None and not environ.get("CONTENT_LENGTH") and "wsgi.input" in environ:
            environ["wsgi.input"] = CappedInput(environ["wsgi.input"], limit)
        return inner(environ, start_response)

    app.wsgi_app = wsgi_app  # type: ignore[method-assign]
