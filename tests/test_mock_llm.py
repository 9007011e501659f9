"""Tests for the mock LLM server: DSPy round trips, determinism, stats and fault injection."""

from __future__ import annotations

import enum
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import httpx
import pydantic
import pytest
from click.testing import CliRunner

from dspy_fleet.devtools.mock_llm import Faults, MockLLMServer, build_server
from dspy_fleet.devtools.mock_llm.cli import command
from dspy_fleet.devtools.mock_llm.limits import ProviderLimits
from dspy_fleet.devtools.mock_llm.responder import respond, solve_arithmetic

ROOT = Path(__file__).resolve().parents[1]


def _serve(server: MockLLMServer) -> threading.Thread:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


def _until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def server() -> Iterator[MockLLMServer]:
    srv = build_server(port=0, seed=7)
    thread = _serve(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def mock_url(server: MockLLMServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def client(mock_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock_url.removesuffix("/v1"), timeout=5) as http:
        yield http


@pytest.fixture(scope="module")
def dspy(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    # Both are read at import time: stay offline and keep the cache out of $HOME.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("DSPY_CACHEDIR", str(tmp_path_factory.mktemp("dspy-cache")))
    import dspy

    return dspy


@pytest.fixture
def lm(dspy: ModuleType, mock_url: str) -> Any:
    return dspy.LM("openai/mock-gpt", api_base=mock_url, api_key="x", cache=False, num_retries=0)


def chat(client: httpx.Client, content: str = "hello", headers: dict | None = None, **body: Any):
    """POST one chat completion with a single user message."""
    payload = {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **body}
    return client.post("/v1/chat/completions", json=payload, headers=headers or {})


# --- DSPy through LiteLLM -------------------------------------------------------------------


def test_predict_returns_answer_and_usage(dspy: ModuleType, lm: Any) -> None:
    with dspy.context(lm=lm, track_usage=True):
        prediction = dspy.Predict("question -> answer")(question="Who wrote Hamlet?")
    assert prediction.answer.startswith("Mock answer ")
    assert prediction.answer.endswith(": Who wrote Hamlet?")
    usage = prediction.get_lm_usage()["openai/mock-gpt"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_arithmetic_question_gets_the_number(dspy: ModuleType, lm: Any) -> None:
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="What is 2+2?").answer == "4"


def test_chain_of_thought_with_two_inputs(dspy: ModuleType, lm: Any) -> None:
    with dspy.context(lm=lm):
        prediction = dspy.ChainOfThought("context, question -> answer")(
            context="Paris is in France.", question="Where is Paris?"
        )
    assert prediction.reasoning.startswith("Mock reasoning ")
    assert prediction.answer.endswith(": Where is Paris?")


def test_typed_signature_parses(dspy: ModuleType, lm: Any, server: MockLLMServer) -> None:
    with dspy.context(lm=lm):
        prediction = dspy.Predict("question -> answer: int, confident: bool, tags: list[str]")(
            question="How many?"
        )
    assert isinstance(prediction.answer, int)
    assert isinstance(prediction.confident, bool)
    assert prediction.tags and all(isinstance(tag, str) for tag in prediction.tags)
    assert server.stats()["chat_completions"] == 1  # parsed first time: no JSON fallback


def test_json_adapter(dspy: ModuleType, lm: Any, server: MockLLMServer) -> None:
    signature = "question -> answer: int, confident: bool, tags: list[str]"
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict(signature)(question="What is 6 * 7?")
    assert prediction.answer == 42
    assert isinstance(prediction.confident, bool) and isinstance(prediction.tags, list)
    assert server.stats()["chat_completions"] == 1


def test_same_input_same_answer_different_input_different_answer(dspy: ModuleType, lm: Any) -> None:
    terse = dspy.Signature("question -> answer", "Answer tersely.")
    with dspy.context(lm=lm):
        first = dspy.Predict("question -> answer")(question="Name a colour.").answer
        again = dspy.Predict("question -> answer")(question="Name a colour.").answer
        other = dspy.Predict("question -> answer")(question="Name a fruit.").answer
        instructed = dspy.Predict(terse)(question="Name a colour.").answer
    assert first == again
    assert len({first, other, instructed}) == 3


# --- The responder on its own -----------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Item(pydantic.BaseModel):
    name: str
    qty: int


def _rich_signature(dspy: ModuleType) -> Any:
    class Rich(dspy.Signature):
        """Fill in every kind of field."""

        text: str = dspy.InputField()
        label: Literal["pos", "neg"] = dspy.OutputField()
        score: float = dspy.OutputField(desc="a score")
        maybe: int | None = dspy.OutputField()
        colour: Colour = dspy.OutputField()
        items: list[Item] = dspy.OutputField()
        counts: dict[str, int] = dspy.OutputField()
        pair: tuple[int, str] = dspy.OutputField()

    return Rich


@pytest.mark.parametrize("adapter_name", ["ChatAdapter", "JSONAdapter"])
@pytest.mark.parametrize(
    "signature",
    [
        "context, question -> answer",
        "question -> answer: int, confident: bool, tags: list[str]",
        "rich",
    ],
)
def test_replies_parse_with_dspy_adapters(
    dspy: ModuleType, adapter_name: str, signature: str
) -> None:
    adapter = getattr(dspy, adapter_name)()
    sig = _rich_signature(dspy) if signature == "rich" else dspy.ensure_signature(signature)
    inputs = dict.fromkeys(sig.input_fields, "some input")
    reply = respond({"messages": adapter.format(sig, demos=[], inputs=inputs)})
    parsed = adapter.parse(sig, reply.content)
    assert set(parsed) == set(sig.output_fields)


def test_answers_imitate_the_casing_of_few_shot_demos(dspy: ModuleType) -> None:
    """A field whose every demo is in capitals is answered in capitals; mixed or ordinary
    demos, or none, leave the answer as it is (the A/B loop test's variants rely on it)."""
    adapter, sig = dspy.ChatAdapter(), dspy.ensure_signature("question -> answer")

    def answer(*demo_answers: str) -> str:
        demos = [dspy.Example(question=f"q{i}?", answer=a) for i, a in enumerate(demo_answers)]
        messages = adapter.format(sig, demos=demos, inputs={"question": "Where to?"})
        return adapter.parse(sig, respond({"messages": messages}).content)["answer"]

    assert answer("PARIS", "THE PACIFIC").isupper()
    for demos in [("Paris", "The Pacific"), ("PARIS", "The Pacific"), ()]:
        assert not answer(*demos).isupper(), demos


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is 2+2?", 4),
        ("what is 12 * 3", 36),
        ("What is (1 + 2) x 3?", 9),
        ("What is 7/2?", 3.5),
        ("what's 2^10?", 1024),
        ("What is 1/0?", None),
        ("What is love?", None),
        ("what is 9**9**9?", None),
        ("2+2", None),
    ],
)
def test_solve_arithmetic(text: str, expected: float | None) -> None:
    assert solve_arithmetic(text) == expected


# --- HTTP endpoints ---------------------------------------------------------------------------


def test_plain_text_and_n_choices(client: httpx.Client) -> None:
    single = chat(client, "Tell me a story", model="other-model").json()
    assert single["object"] == "chat.completion" and single["model"] == "other-model"
    assert single["choices"][0]["message"]["content"].startswith("Mock response ")
    assert single["choices"][0]["finish_reason"] == "stop"
    several = chat(client, "Tell me a story", n=3).json()
    contents = [c["message"]["content"] for c in several["choices"]]
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    assert contents[0] == single["choices"][0]["message"]["content"]
    assert several["usage"]["completion_tokens"] > single["usage"]["completion_tokens"]


def test_models_health_and_unknown_route(client: httpx.Client) -> None:
    chat(client, model="seen-model")
    assert client.get("/health").json() == {"status": "ok"}
    for path in ("/v1/models", "/models"):
        listing = client.get(path).json()
        assert listing["object"] == "list"
        assert {"mock-gpt", "seen-model"} <= {m["id"] for m in listing["data"]}
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_stream_is_server_sent_events(client: httpx.Client) -> None:
    response = chat(client, "What is 3*3?", stream=True, stream_options={"include_usage": True})
    assert response.headers["content-type"] == "text/event-stream"
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "9"
    assert json.loads(events[-2])["usage"]["total_tokens"] > 0


def test_keep_alive_reuses_the_connection(server: MockLLMServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    conn.request("GET", "/health")
    conn.getresponse().read()
    first_socket = conn.sock
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": []}))
    assert conn.getresponse().status == 200
    assert conn.sock is first_socket
    conn.close()


def test_stats_count_and_reset(client: httpx.Client) -> None:
    chat(client, model="a")
    chat(client, model="b")
    chat(client, model="a", headers={"X-Mock-Status": "503"})
    client.post("/v1/chat/completions", content=b"[")
    client.get("/health")
    stats = client.get("/_mock/stats").json()
    recent = stats.pop("recent")
    assert [r["status"] for r in recent] == [200, 200, 503, 400]
    assert all(a["time"] <= b["time"] for a, b in zip(recent, recent[1:], strict=False))
    assert stats == {
        "requests_total": 5,
        "chat_completions": 4,
        "succeeded": 2,
        "failed": 2,
        "by_status": {"200": 2, "503": 1, "400": 1},
        "by_model": {"a": 2, "b": 1},
        "in_flight": 0,
        "rate_limited": {},
        "rate_limited_by_model": {},
    }
    assert client.post("/_mock/reset").status_code == 200
    stats = client.get("/_mock/stats").json()
    assert stats["requests_total"] == stats["chat_completions"] == stats["failed"] == 0
    assert stats["by_status"] == {}
    assert stats["recent"] == []


# --- Fault injection --------------------------------------------------------------------------


def test_fail_next_gives_exactly_n_errors(client: httpx.Client) -> None:
    put = client.put("/_mock/faults", json={"fail_next": 2, "error_status": 429, "retry_after": 2})
    assert put.status_code == 200 and put.json()["fail_next"] == 2
    for _ in range(2):
        response = chat(client)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        assert response.headers["retry-after-ms"] == "2000"
        assert response.json()["error"]["type"] == "rate_limit_error"
    assert chat(client).status_code == 200
    assert client.get("/_mock/faults").json()["fail_next"] == 0


def test_error_every_fails_exactly_every_nth_request(client: httpx.Client) -> None:
    put = client.put("/_mock/faults", json={"error_every": 5, "error_status": 503})
    assert put.status_code == 200 and put.json()["error_every"] == 5
    statuses = [chat(client).status_code for _ in range(20)]
    assert statuses == ([200] * 4 + [503]) * 4  # a fifth of the calls, never two in a row
    # Forced statuses are not counted; a new setting starts counting again.
    assert chat(client, headers={"X-Mock-Status": "200"}).status_code == 200
    client.put("/_mock/faults", json={"error_every": 2})
    assert [chat(client).status_code for _ in range(4)] == [200, 503, 200, 503]
    client.put("/_mock/faults", json={"error_every": 0})
    assert all(chat(client).status_code == 200 for _ in range(5))


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_limit_admits_the_rate_and_one_burst_never_more() -> None:
    clock = FakeClock()
    limits = ProviderLimits(rpm=600, clock=clock)  # 10/s, a burst of 1 s = 10
    assert [limits.admit("m") for _ in range(10)] == [None] * 10
    refusal = limits.admit("m")
    assert refusal is not None and refusal.limit == "requests" and refusal.per_minute == 600
    assert refusal.retry_after == pytest.approx(0.1)
    assert limits.admit("other") is None  # each model has its own limit
    clock.now += 0.1
    assert limits.admit("m") is None and limits.admit("m") is not None
    # A client asking 100 times a second for 60 s gets the rate plus the one burst.
    admitted = 0
    for _ in range(6000):
        clock.now += 0.01
        admitted += limits.admit("steady") is None
    assert 600 <= admitted <= 600 + 10


def test_tpm_limit_debits_answers_and_waits_for_the_deficit() -> None:
    clock = FakeClock()
    limits = ProviderLimits(tpm=6000, clock=clock)  # 100 tokens/s, a burst of 100
    assert limits.admit("m") is None
    limits.charge("m", 250)  # the answer was long: the bucket is at -150
    refusal = limits.admit("m")
    assert refusal is not None and refusal.limit == "tokens"
    assert refusal.retry_after == pytest.approx(1.51)
    clock.now += 1.51
    assert limits.admit("m") is None
    assert limits.headers("m")["x-ratelimit-limit-tokens"] == "6000"


def test_rate_limit_answers_429_as_a_provider_does(client: httpx.Client) -> None:
    put = client.put("/_mock/faults", json={"rpm_limit": 60, "limit_burst_seconds": 2})
    assert put.status_code == 200 and put.json()["rpm_limit"] == 60
    assert [chat(client).status_code for _ in range(2)] == [200, 200]  # the 2 s burst
    over = chat(client)
    assert over.status_code == 429
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.headers["Retry-After"] == "1"
    assert 0 < int(over.headers["retry-after-ms"]) <= 1000
    assert over.headers["x-ratelimit-limit-requests"] == "60"
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    # Another model has its own limit; changing an unrelated fault keeps the buckets.
    assert chat(client, model="other-gpt").status_code == 200
    client.put("/_mock/faults", json={"latency_ms": 0})
    assert chat(client).status_code == 429
    stats = client.get("/_mock/stats").json()
    assert stats["rate_limited"] == {"requests": 2} and stats["by_status"]["429"] == 2
    # Waiting out Retry-After is enough; lifting the limit ends it.
    time.sleep(int(over.headers["retry-after-ms"]) / 1000 + 0.05)
    assert chat(client).status_code == 200
    client.put("/_mock/faults", json={"rpm_limit": 0})
    assert all(chat(client).status_code == 200 for _ in range(5))


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"nope": 1}, "nope"),
        ({"error_every": -1}, "error_every"),
        ({"error_every": 2.5}, "error_every"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"latency_ms": -5}, "latency_ms"),
        ({"error_status": 200}, "error_status"),
        ({"fail_next": 1.5}, "fail_next"),
        ({"hang_rate": "often"}, "hang_rate"),
        ({"retry_after": float("inf")}, "retry_after"),
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"tpm_limit": 1.5}, "tpm_limit"),
        ({"limit_burst_seconds": 0}, "limit_burst_seconds"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_fault_settings_are_rejected(client: httpx.Client, body: Any, named: str) -> None:
    before = client.get("/_mock/faults").json()
    response = client.put("/_mock/faults", content=json.dumps(body))
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]
    assert client.get("/_mock/faults").json() == before
    if isinstance(body, dict):
        with pytest.raises(ValueError, match=named):
            Faults.from_dict(body)


def test_per_request_overrides(client: httpx.Client) -> None:
    forced = chat(client, headers={"X-Mock-Status": "503"})
    assert forced.status_code == 503 and forced.json()["error"]["type"] == "server_error"
    in_body = chat(client, mock={"status": 429, "retry_after": 1})
    assert in_body.status_code == 429 and in_body.headers["Retry-After"] == "1"
    bad = chat(client, headers={"X-Mock-Status": "teapot"})
    assert bad.status_code == 400 and "Status" in bad.json()["error"]["message"]


def test_latency_is_injected(client: httpx.Client) -> None:
    client.put("/_mock/faults", json={"latency_ms": 250})
    start = time.monotonic()
    assert chat(client).status_code == 200
    assert time.monotonic() - start >= 0.25
    start = time.monotonic()
    chat(client, headers={"X-Mock-Latency-Ms": "100"})
    assert 0.1 <= time.monotonic() - start < 0.25


def test_hang_ends_with_the_client_timeout(
    client: httpx.Client, mock_url: str, server: MockLLMServer
) -> None:
    client.put("/_mock/faults", json={"hang_rate": 1, "hang_seconds": 30})
    outcome: list[BaseException] = []

    def hang() -> None:
        with httpx.Client(base_url=mock_url, timeout=0.5) as impatient:
            try:
                impatient.post("/chat/completions", json={"messages": []})
            except httpx.TimeoutException as exc:
                outcome.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=hang)
    thread.start()
    assert _until(lambda: server.stats()["in_flight"] == 1)
    # Meanwhile the server answers others (this one is exempted from the hang).
    assert chat(client, headers={"X-Mock-Hang-Seconds": "0"}).status_code == 200
    thread.join(5)
    assert outcome and time.monotonic() - start < 3
    # The server notices the client left, frees the thread and counts it as 499.
    assert _until(lambda: server.stats()["in_flight"] == 0)
    assert server.stats()["by_status"] == {"200": 1, "499": 1}


def test_shutdown_while_a_request_hangs() -> None:
    srv = build_server(port=0, faults=Faults(hang_rate=1, hang_seconds=30))
    thread = _serve(srv)
    statuses: list[int] = []

    def hang() -> None:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"
        statuses.append(httpx.post(url, json={"messages": []}, timeout=10).status_code)

    waiter = threading.Thread(target=hang)
    waiter.start()
    assert _until(lambda: srv.stats()["in_flight"] == 1)
    start = time.monotonic()
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    waiter.join(5)
    assert time.monotonic() - start < 1.5
    assert statuses == [200]  # the hang ended early and the request was answered


def test_seeded_faults_repeat() -> None:
    import random

    def run(seed: int) -> list[int]:
        faults, rng = Faults(error_rate=0.5), random.Random(seed)
        return [faults.decide(rng).status for _ in range(40)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert set(run(3)) == {200, 500}


# --- The command line -------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_module_runs_as_a_subprocess(stop_signal: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspy_fleet.devtools.mock_llm", "--port", "0", "--log-requests"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"mock-llm listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match and match[2] != "0", line
        with httpx.Client(base_url=match[1], timeout=5) as http:
            reply = http.post(
                "/chat/completions",
                json={"messages": [{"role": "user", "content": "What is 2+2?"}]},
            )
            assert reply.json()["choices"][0]["message"]["content"] == "4"
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=5) == 0
        logged = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
        assert [(x["path"], x["status"]) for x in logged] == [("/v1/chat/completions", 200)]
    finally:
        proc.kill()
        proc.communicate()


def test_server_modules_do_not_import_heavy_packages() -> None:
    code = (
        "import sys, dspy_fleet.devtools.mock_llm.cli, dspy_fleet.devtools.mock_llm.__main__\n"
        "print(sorted({'dspy', 'litellm', 'flask'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_cli_rejects_bad_options() -> None:
    result = CliRunner().invoke(command, ["--error-rate", "2"])
    assert result.exit_code == 2 and "error_rate" in result.output


def test_a_status_base_url_fails_every_call_through_it(
    client: httpx.Client, mock_url: str, dspy: ModuleType
) -> None:
    # For a model that must always fail where the client sets only a base URL (DSPy's own
    # engine sends no extra headers): bench/stack.py's `fragile`.
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/_status/503/chat/completions", "/_status/503/v1/chat/completions"):
        assert client.post(path, json=payload).status_code == 503
    # A header still wins over the path, as over the server-wide faults.
    assert client.post("/_status/503/v1/chat/completions", json=payload,
                       headers={"X-Mock-Status": "200"}).status_code == 200  # fmt: skip
    assert client.post("/_status/200/v1/chat/completions", json=payload).status_code == 200
    assert client.post("/_status/999/v1/chat/completions", json=payload).status_code == 404
    base = mock_url + "/_status/500"
    lm = dspy.LM("openai/m", api_base=base, api_key="x", cache=False, num_retries=0)
    with dspy.context(lm=lm), pytest.raises(Exception, match="mock-llm injected error"):
        dspy.Predict("question -> answer")(question="anything")
