"""A stub LLM provider for tests: an OpenAI-compatible HTTP server whose answers the test writes.

The first path segment is a route the test names (``/<route>/v1/chat/completions``), so one
server plays several providers at once: ``stub.base("fail")`` is the ``api_base`` of one. A
test hands in ``respond(route, nth, request) -> Reply``; ``nth`` counts that route's calls
from 1 and ``request`` is the JSON the client sent (DSPy's prompt is in its ``messages``).
The server runs in the test's process, so workers in other processes reach it over real HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# DSPy's ChatAdapter reads `[[ ## field ## ]]` sections; a "question -> answer" program.
CHAT_ANSWER = "[[ ## answer ## ]]\nforty-two\n\n[[ ## completed ## ]]"
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
_ABSENT: Any = object()


class BurstServer(ThreadingHTTPServer):
    """A threaded test server whose listen backlog takes a burst of connections.

    socketserver's default backlog is 5: a burst of 120 calls from a worker's pool overflowed
    it and the kernel reset connections, which the fleet rightly retried as provider faults,
    spending attempts a test did not expect. A provider's load balancer does not refuse a
    burst this size; the mock LLM's server uses the same figure."""

    daemon_threads = True
    request_queue_size = 1024


@dataclass
class Reply:
    """One HTTP answer: status, JSON body, extra headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def completion(content: str = CHAT_ANSWER, usage: Any = USAGE) -> Reply:
    """A 200 chat completion; ``usage=None`` sends ``"usage": null``, ``absent()`` no key."""
    body: dict[str, Any] = {
        "id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
    }  # fmt: skip
    if usage is not _ABSENT:
        body["usage"] = usage
    return Reply(200, body)


def absent() -> Any:
    """The ``usage`` argument of :func:`completion` that leaves the key out."""
    return _ABSENT


def error(status: int, message: str, type_: str | None = None, code: Any = None,
          headers: dict[str, str] | None = None) -> Reply:  # fmt: skip
    """An OpenAI-shaped error answer: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Reply(status, body, dict(headers or {}))


def prompt_text(request: dict[str, Any]) -> str:
    """Everything the client's messages say, as one string (to find a test's marker)."""
    parts = []
    for message in request.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content))
    return "\n".join(parts)


# --- what a LiteLLM proxy answers ----------------------------------------------------------
# Shapes from LiteLLM's proxy (litellm/proxy/_types.py ProxyException.to_dict: "code" is the
# HTTP status as a string; common_request_processing.py sets Retry-After on a cooldown) and
# router (litellm/types/router.py RouterRateLimitError's message).

INVALID_KEY = (
    "litellm.AuthenticationError: AuthenticationError: OpenAIException - Incorrect API key "
    "provided: sk-stub****. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)


def proxy_auth_error(type_: str = "auth_error") -> Reply:
    """The proxy forwarding the provider's 401 (its message names LiteLLM's exception)."""
    return error(401, INVALID_KEY, type_, "401")


def proxy_cooldown(cooled_by: list[tuple[int, str]] | None = None, *, seconds: int = 5,
                   model: str = "gpt-4o-mini") -> Reply:  # fmt: skip
    """The proxy's 429 while every deployment of ``model`` cools down.

    ``cooled_by`` None: today's message, which lists deployment ids only (and the error type
    ``all_deployments_in_cooldown``); else the older debug form that lists each deployment
    with the status and the exception that cooled it, e.g. ``[(401, INVALID_KEY)]``."""
    if cooled_by is None:
        listed, type_ = "['6f2a9c']", "all_deployments_in_cooldown"
    else:
        entries = [
            (f"dep-{i}", {"exception_received": text, "status_code": str(status),
                          "timestamp": 1767225600.0 + i, "cooldown_time": seconds})
            for i, (status, text) in enumerate(cooled_by)
        ]  # fmt: skip
        listed, type_ = repr(entries), "None"
    message = (
        f"litellm.RateLimitError: No deployments available for selected model, Try again in "
        f"{seconds} seconds. Passed model={model}. pre-call-checks=False, cooldown_list={listed}"
    )
    return error(429, message, type_, "429", headers={"retry-after": str(seconds)})


def rate_limited(retry_after: float | None = None) -> Reply:
    """A provider's own 429 (OpenAI's body), with Retry-After when given."""
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded",
                 headers=headers)  # fmt: skip


Respond = Callable[[str, int, dict[str, Any]], Reply]


class StubProvider:
    """The server (see the module docstring); ``calls[route]`` counts each route's calls."""

    def __init__(self, respond: Respond) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    request = json.loads(raw or b"{}")
                except ValueError:
                    request = {}
                route = self.path.strip("/").split("/")[0]
                with stub._lock:
                    nth = stub.calls[route] = stub.calls.get(route, 0) + 1
                reply = respond(route, nth, request)
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = BurstServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def base(self, route: str) -> str:
        """The ``api_base`` of one route."""
        return f"{self.url}/{route}/v1"

    @property
    def total(self) -> int:
        """Calls on every route."""
        with self._lock:
            return sum(self.calls.values())

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def stub_provider(respond: Respond) -> Iterator[StubProvider]:
    """A running :class:`StubProvider`, stopped on exit (for fixtures)."""
    stub = StubProvider(respond)
    try:
        yield stub
    finally:
        stub.stop()
