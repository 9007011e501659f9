"""The OpenAI-compatible mock LLM HTTP server (standard library only)."""

from __future__ import annotations

import json
import math
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from dspy_fleet.devtools.mock_llm.faults import Decision, Faults, Overrides
from dspy_fleet.devtools.mock_llm.limits import ProviderLimits, Refusal
from dspy_fleet.devtools.mock_llm.responder import respond

DEFAULT_MODEL = "mock-gpt"
MAX_BODY_BYTES = 16 * 1024 * 1024
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# A fixed status for every call through a base URL ending in /_status/<code> (the mock's
# usual base URL, `.../v1`, plus that): a model that always fails, for a client whose only
# per-model setting is the base URL (DSPy's own engine sends no extra headers).
_STATUS_PATH = re.compile(r"^(?:/v1)?/_status/(\d{3})(?:/v1)?/chat/completions$")
_OVERRIDE_HEADERS = (
    "X-Mock-Latency-Ms",
    "X-Mock-Status",
    "X-Mock-Retry-After",
    "X-Mock-Hang-Seconds",
)
# Status recorded when the client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """Return an OpenAI-style error body for `status`."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}


class MockLLMServer(ThreadingHTTPServer):
    """Threaded HTTP server holding the fault settings, counters and the shutdown event."""

    daemon_threads = True  # hanging requests must never keep the process alive
    request_queue_size = 1024  # load tests open many connections at once

    def __init__(
        self,
        address: tuple[str, int],
        faults: Faults | None = None,
        seed: int | None = None,
        log_requests: bool = False,
    ) -> None:
        self.faults = faults or Faults()
        self.limits = self._limits_of(self.faults)
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.log_requests = log_requests
        self.models_seen: set[str] = {DEFAULT_MODEL}
        self.started = int(time.time())
        self.reset_stats()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, MockLLMHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host (slow when offline)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def reset_stats(self) -> None:
        """Zero the counters (the in-flight gauge is live state and is kept)."""
        with self.lock:
            self.requests_total = self.chat_completions = self.succeeded = self.failed = 0
            self.by_status: Counter[str] = Counter()
            self.by_model: Counter[str] = Counter()
            # The latest answered chat requests with their times: tests measure
            # retry spacing (e.g. that a 429's Retry-After was honoured) from it.
            self.recent: deque[dict[str, Any]] = deque(maxlen=200)
            self.in_flight = getattr(self, "in_flight", 0)
            # 429s answered because a rate limit was reached, by limit ("requests", "tokens").
            self.rate_limited: Counter[str] = Counter()
            self.rate_limited_by_model: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        """Return a snapshot of the counters."""
        with self.lock:
            return {
                "requests_total": self.requests_total,
                "chat_completions": self.chat_completions,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "by_status": dict(self.by_status),
                "by_model": dict(self.by_model),
                "in_flight": self.in_flight,
                "rate_limited": dict(self.rate_limited),
                "rate_limited_by_model": dict(self.rate_limited_by_model),
                "recent": list(self.recent),
            }

    def record_chat(self, model: str | None, status: int) -> None:
        """Count one finished chat request."""
        with self.lock:
            self.by_status[str(status)] += 1
            self.recent.append({"time": time.time(), "status": status, "model": model})
            if model:
                self.by_model[model] += 1
            if status == 200:
                self.succeeded += 1
            else:
                self.failed += 1

    def decide(self, overrides: Overrides) -> Decision:
        """Let the current faults decide a request's fate, under the lock."""
        with self.lock:
            return self.faults.decide(self.rng, overrides)

    @staticmethod
    def _limits_of(faults: Faults) -> ProviderLimits:
        return ProviderLimits(faults.rpm_limit, faults.tpm_limit, faults.limit_burst_seconds)

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault settings; the rate-limit buckets only when their limits change."""
        with self.lock:
            self.faults = faults
            new = self._limits_of(faults)
            old = self.limits
            if (new.rpm, new.tpm, new.burst_seconds) != (old.rpm, old.tpm, old.burst_seconds):
                self.limits = new

    def admit(self, model: str) -> tuple[Refusal | None, dict[str, str]]:
        """Take one request for ``model`` from the rate limits: (refusal or None, headers)."""
        with self.lock:
            refusal = self.limits.admit(model)
            if refusal is not None:
                self.rate_limited[refusal.limit] += 1
                self.rate_limited_by_model[model] += 1
            return refusal, self.limits.headers(model)

    def charge(self, model: str, total_tokens: int) -> None:
        """Debit an answered request's tokens from the model's TPM bucket."""
        with self.lock:
            self.limits.charge(model, total_tokens)

    def shutdown(self) -> None:
        """Wake hanging requests, then stop serve_forever()."""
        self.stopping.set()
        super().shutdown()

    def server_close(self) -> None:
        """Close the listening socket; any request still waiting answers at once."""
        self.stopping.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hung up; report real bugs as usual."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class MockLLMHandler(BaseHTTPRequestHandler):
    """Routes one HTTP/1.1 connection's requests to the mock endpoints."""

    server: MockLLMServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "mock-llm/0.1"
    timeout = 300  # idle keep-alive connections are dropped after this many seconds
    # Headers and body go out in two writes on a keep-alive connection: with Nagle's
    # algorithm the second waits for the client's delayed ACK (~40 ms per call).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib access log; --log-requests writes JSON lines instead."""

    def do_GET(self) -> None:
        """Dispatch a GET."""
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        start = time.monotonic()
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._model: str | None = None
        self._reason = ""
        try:
            # Always consume the body, so the next request on this connection parses.
            body = self._read_body()
            if not path.startswith("/_mock/"):
                with self.server.lock:
                    self.server.requests_total += 1
            status = self._route(path, body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            status = CLIENT_CLOSED
        if self.server.log_requests:
            line = {
                "ts": round(time.time(), 3),
                "method": self.command,
                "path": path,
                "status": status,
                "model": self._model,
                "ms": round((time.monotonic() - start) * 1000, 1),
                "fault": self._reason or None,
            }
            print(json.dumps(line), file=sys.stderr, flush=True)

    def _read_body(self) -> bytes | None:
        """Read the request body by Content-Length; None when it is too large."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = MAX_BODY_BYTES + 1  # unreadable length: treat like an oversized body
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # cannot skip that much; drop the connection after
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _route(self, path: str, body: bytes | None) -> int:
        method = self.command
        if body is None:
            return self._send(413, error_body(413, "body too large or bad Content-Length"))
        if path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
            return self._chat(body)
        if (fixed := _STATUS_PATH.match(path)) and method == "POST":
            try:
                base = Overrides.from_mapping({"status": fixed.group(1)})
            except ValueError as exc:
                return self._send(404, error_body(404, str(exc)))
            return self._chat(body, base)
        if path in ("/v1/models", "/models") and method == "GET":
            with self.server.lock:
                names = sorted(self.server.models_seen)
            data = [
                {"id": n, "object": "model", "created": self.server.started, "owned_by": "mock-llm"}
                for n in names
            ]
            return self._send(200, {"object": "list", "data": data})
        if path == "/health" and method == "GET":
            return self._send(200, {"status": "ok"})
        if path == "/_mock/stats" and method == "GET":
            return self._send(200, self.server.stats())
        if path == "/_mock/reset" and method == "POST":
            self.server.reset_stats()
            return self._send(200, self.server.stats())
        if path == "/_mock/faults" and method in ("GET", "PUT"):
            return self._faults(body) if method == "PUT" else self._send_faults()
        return self._send(404, error_body(404, f"no route for {method} {path}"))

    def _send_faults(self) -> int:
        with self.server.lock:
            current = self.server.faults.to_dict()
        return self._send(200, current)

    def _faults(self, body: bytes) -> int:
        try:
            patch = json.loads(body or b"{}")
            with self.server.lock:
                faults = self.server.faults.updated(patch)
            self.server.set_faults(faults)
        except ValueError as exc:  # JSONDecodeError is a ValueError too
            return self._send(400, error_body(400, str(exc), "invalid_fault_setting"))
        return self._send_faults()

    def _chat(self, raw: bytes, base: Overrides | None = None) -> int:
        with self.server.lock:
            self.server.chat_completions += 1
            self.server.in_flight += 1
        status = CLIENT_CLOSED
        try:
            status = self._chat_inner(raw, base or Overrides())
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
            self.server.record_chat(self._model, status)
        return status

    def _chat_inner(self, raw: bytes, base: Overrides) -> int:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._send(400, error_body(400, f"malformed JSON body: {exc}"))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._send(400, error_body(400, "body must be a JSON object with 'messages'"))
        model = self._model = str(body.get("model") or DEFAULT_MODEL)
        with self.server.lock:
            self.server.models_seen.add(model)
        try:
            headers = {
                h[len("X-Mock-") :]: self.headers[h]
                for h in _OVERRIDE_HEADERS
                if self.headers.get(h) is not None
            }
            mock = body.get("mock") or {}
            if not isinstance(mock, dict):
                raise ValueError("mock: expected a JSON object")
            # Headers win over the body (the quickest thing to change in a curl demo), and
            # both over the path's status.
            overrides = base.merged(Overrides.from_mapping(mock)).merged(
                Overrides.from_mapping(headers)
            )
            n = int(body.get("n") or 1)
            if not 1 <= n <= 128:
                raise ValueError(f"n: must be between 1 and 128, got {n}")
        except (ValueError, TypeError) as exc:
            return self._send(400, error_body(400, str(exc)))

        refusal, limit_headers = self.server.admit(model)
        if refusal is not None:
            return self._rate_limited(model, refusal, limit_headers)
        decision = self.server.decide(overrides)
        self._reason = decision.reason
        if not self._wait(decision.delay_s) or not self._wait(decision.hang_s):
            self.close_connection = True
            return CLIENT_CLOSED
        if decision.status != 200:
            headers = {}
            if decision.retry_after is not None:
                # Retry-After takes whole seconds; OpenAI's retry-after-ms carries the exact value.
                headers["Retry-After"] = str(math.ceil(decision.retry_after))
                headers["retry-after-ms"] = str(round(decision.retry_after * 1000))
            message = f"mock-llm injected error ({decision.reason or 'forced'})"
            return self._send(
                decision.status,
                error_body(decision.status, message, "mock_injected_error"),
                headers,
            )
        replies = [respond(body, i) for i in range(n)]
        usage = {
            "prompt_tokens": replies[0].prompt_tokens,
            "completion_tokens": sum(r.completion_tokens for r in replies),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.server.charge(model, usage["total_tokens"])
        if body.get("stream"):
            return self._stream(body, [r.content for r in replies], usage)
        payload = {
            "id": f"chatcmpl-mock-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model,
            "system_fingerprint": "mock-llm",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i, r in enumerate(replies)
            ],
            "usage": usage,
        }
        return self._send(200, payload)

    def _rate_limited(self, model: str, refusal: Refusal, limit_headers: dict[str, str]) -> int:
        """429 as a provider answers it over a limit: Retry-After, retry-after-ms and the
        x-ratelimit-* headers; the body's code is OpenAI's ``rate_limit_exceeded``."""
        self._reason = f"{refusal.limit}_limit"
        wait_ms = max(1, math.ceil(refusal.retry_after * 1000))
        headers = {
            **limit_headers,
            "Retry-After": str(max(1, math.ceil(refusal.retry_after))),
            "retry-after-ms": str(wait_ms),
        }
        message = (
            f"Rate limit reached for {model} on {refusal.limit} per min (RPM/TPM): "
            f"Limit {refusal.per_minute}. Please try again in {wait_ms}ms."
        )
        return self._send(429, error_body(429, message, "rate_limit_exceeded"), headers)

    def _stream(self, body: dict[str, Any], contents: list[str], usage: dict[str, int]) -> int:
        """Answer `stream: true` as server-sent events, all at once (still with Content-Length)."""
        base = {
            "id": f"chatcmpl-mock-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model,
        }
        events = [
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": c},
                        "finish_reason": None,
                    }
                ],
            }
            for i, c in enumerate(contents)
        ]
        events += [
            {**base, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}
            for i in range(len(contents))
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return self._send(200, text.encode(), content_type="text/event-stream")

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, ending early at shutdown; False if the client hung up."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.server.stopping.wait(min(remaining, 0.1)):
                return True
            if self._peer_closed():
                return False
        return True

    def _peer_closed(self) -> bool:
        """True when the client closed its end (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> int:
        """Write one complete response with Content-Length; returns `status`."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.server.stopping.is_set() or self.close_connection:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return CLIENT_CLOSED
        return status


def build_server(
    host: str = "127.0.0.1",
    port: int = 8900,
    faults: Faults | None = None,
    seed: int | None = None,
    log_requests: bool = False,
) -> MockLLMServer:
    """Create a bound (not yet serving) mock server; port 0 picks a free port."""
    return MockLLMServer((host, port), faults=faults, seed=seed, log_requests=log_requests)
