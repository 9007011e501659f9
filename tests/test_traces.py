"""Traces in pieces: redaction, the byte cap, the example a kept trace becomes, and the
store's Lua (keep, cap, park, keep on feedback) on a real redis-server. The end-to-end run
with workers, the CLI and a DSPy optimizer is tests/test_dspy_round_trip.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dspy_fleet.contract import utcnow
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.examples import example_record
from dspy_fleet.store.feedback import FeedbackStore, parse_outcome
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.store.traces import TraceStore, finish_fields
from worker.traces import REDACTED, encode, redact


def a_trace(job_id: str, **over: Any) -> dict[str, Any]:
    doc = {
        "job_id": job_id, "program": "qa", "variant": "a", "program_version": "v1",
        "tenant": "alpha", "status": "succeeded", "inputs": {"question": "q?", "ssn": "123"},
        "outputs": {"answer": "Paris", "reasoning": "because"}, "input_fields": ["question", "ssn"],
        "lm_calls": [{"model": "m", "outputs": ["[[ ## answer ## ]]\nParis"],
                      "messages": [{"role": "user", "content": "[[ ## ssn ## ]]\n123"}]}],
        "truncated": False, "redacted": [],
    }  # fmt: skip
    return {**doc, **over}


def test_sensitive_values_are_redacted_in_fields_messages_and_answers() -> None:
    doc = redact(a_trace("j"), ["ssn", "answer", "not_a_field"])
    assert doc["inputs"] == {"question": "q?", "ssn": REDACTED}
    assert doc["outputs"] == {"answer": REDACTED, "reasoning": "because"}
    text = json.dumps(doc["lm_calls"])
    assert "123" not in text and "Paris" not in text and text.count(REDACTED) == 2
    assert doc["redacted"] == ["answer", "ssn"]
    untouched = redact(a_trace("j"), [])
    assert untouched["inputs"]["ssn"] == "123" and untouched["redacted"] == []


def test_a_trace_over_the_byte_cap_loses_its_lm_text_then_is_dropped() -> None:
    small, cut = encode(a_trace("j"), 10_000)
    assert small is not None and not cut and "Paris" in small
    big = a_trace("j", lm_calls=[{"model": "m", "messages": "x" * 5000, "outputs": ["y"]}])
    text, cut = encode(big, 2000)
    assert text is not None and cut and json.loads(text)["truncated"] is True
    assert json.loads(text)["lm_calls"] == [{"model": "m", "error": None}]
    huge = a_trace("j", inputs={"question": "z" * 5000})
    assert encode(huge, 2000) == (None, True)


def test_an_example_takes_the_latest_expected_output_and_the_mean_score() -> None:
    feedback = [
        {"score": 0.2, "created_at": "2026-01-01T00:00:00Z", "expected": {"answer": "Lyon"}},
        {"score": 0.6, "created_at": "2026-01-02T00:00:00Z", "expected": {"answer": "Nice"}},
        {"score": 1.0, "created_at": "2026-01-03T00:00:00Z"},
    ]
    record = example_record({"trace": a_trace("j"), "feedback": feedback})
    assert record is not None
    assert record["answer"] == "Nice" and record["reasoning"] == "because"
    assert record["dspy_score"] == pytest.approx(0.6)
    assert record["dspy_fleet"]["label"] == "expected" and record["dspy_fleet"]["job_id"] == "j"
    plain = example_record({"trace": a_trace("j"), "feedback": []})
    assert plain is not None and plain["answer"] == "Paris" and plain["dspy_score"] is None
    assert example_record({"trace": a_trace("j", status="failed"), "feedback": []}) is None

    import dspy

    example = dspy.Example(**record).with_inputs("question", "ssn")
    assert sorted(example.labels().keys()) == ["answer", "reasoning"]
    assert sorted(example.inputs().keys()) == ["question", "ssn"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(log_path=tmp_path_factory.mktemp("tr") / "redis.log").start()
    yield srv
    srv.stop()


def finish(store: JobStore, job_id: str, keep: bool, cap: int = 3) -> None:
    store.create(job_id, {"program": "qa", "variant": "a", "tenant": "alpha", "model": "mock",
                          "program_version": "v1"})  # fmt: skip
    doc = json.dumps(a_trace(job_id))
    fields = {"status": "succeeded", "outputs": {"answer": "Paris"}, "finished_at": utcnow(),
              **finish_fields(doc, keep=keep, ttl_seconds=3600, cap=cap,
                              window_seconds=600)}  # fmt: skip
    assert store.finish(job_id, fields) == 1


def test_kept_traces_are_capped_and_a_feedback_keeps_a_parked_one(
    server: RedisServer, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    jobs, traces = JobStore(client, 3600), TraceStore(client)
    for i in range(5):
        finish(jobs, f"kept-{i}", keep=True)
    kept = [t["trace"]["job_id"] for t in traces.scan("qa", 0)]
    assert kept == ["kept-2", "kept-3", "kept-4"]  # the cap: the oldest went, hashes too
    assert traces.get("kept-0") is None and client.exists("dspy_fleet:trace:kept-1") == 0
    job = client.hgetall(JobStore.key("kept-4"))
    assert "trace" not in job and "trace_keep" not in job  # moved off the job's record

    finish(jobs, "parked", keep=False)
    assert traces.pending("parked") and traces.get("parked") is None
    assert 0 < client.ttl("dspy_fleet:trace_pending:parked") <= 600
    posted = FeedbackStore(client).post(
        "parked", "qa", "review", {"score": 0.7, "expected": {"answer": "Nice"}},
        trace_ttl_seconds=3600, trace_cap=3,
    )  # fmt: skip
    assert posted.status == "ok" and posted.traced
    got = traces.get("parked")
    assert got is not None and got["feedback"] == [{"score": 0.7, "expected": {"answer": "Nice"}}]
    assert not traces.pending("parked")
    assert [t["trace"]["job_id"] for t in traces.scan("qa", 0)][-1] == "parked"
    assert [t for t in traces.scan("qa", 0, version="v2")] == []
    assert len(list(traces.scan("qa", 0, variant="a", tenant="alpha"))) == 3

    # The outcome sample of the A/B report names the program version that ran.
    (member,) = client.zrangebyscore("dspy_fleet:outcomes:qa", "-inf", "+inf", start=0, num=1)
    outcome = parse_outcome(member)
    assert outcome is not None and outcome.program_version == "v1"


CONFIG = """
default_model: mock
models:
  mock: {litellm_model: openai/mock, api_base: "http://127.0.0.1:9/v1", timeout: 5}
programs:
  qa: {signature: "question -> answer", variants: {a: {weight: 1}}}
"""


@pytest.fixture(scope="module")
def api(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from api import create_app

    path = tmp_path_factory.mktemp("trcfg") / "fleet.yaml"
    path.write_text(CONFIG)
    settings = {"redis_url": server.url, "config": str(path)}
    return create_app({"keep_logging": True, "settings": settings}).test_client()


@pytest.mark.parametrize(
    "query",
    ["min_score=2", "min_score=nan", "min_score=x", "since=yesterday", "variant=a%20b",
     "version=" + "v" * 65, "limit=0", "limit=1001", "limit=1.5"],
)  # fmt: skip
def test_bad_trace_and_example_queries_are_422_in_the_one_error_format(
    api: Any, query: str
) -> None:
    path = "traces" if query.startswith("limit") else "examples"
    resp = api.get(f"/v1/programs/qa/{path}?{query}")
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "validation_error"
    assert api.get(f"/v1/programs/nope/{path}").status_code == 404


def test_the_report_and_the_examples_filter_by_program_version(
    api: Any, server: RedisServer
) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    jobs = JobStore(client, 3600)
    for i, version in enumerate(["w1", "w1", "w2"]):
        job_id = f"ver-{i}"
        jobs.create(job_id, {"program": "qa", "variant": "a", "tenant": "anonymous",
                             "model": "mock", "program_version": version})  # fmt: skip
        doc = json.dumps(a_trace(job_id, program_version=version, tenant="anonymous"))
        fields = {"status": "succeeded", "outputs": {"answer": "Paris"}, "finished_at": utcnow(),
                  **finish_fields(doc, keep=True, ttl_seconds=3600, cap=100,
                                  window_seconds=600)}  # fmt: skip
        assert jobs.finish(job_id, fields) == 1
    report = api.get("/v1/programs/qa/report?version=w1").get_json()
    assert report["version"] == "w1" and report["variants"]["a"]["n"] == 2
    assert api.get("/v1/programs/qa/report").get_json()["variants"]["a"]["n"] >= 8
    resp = api.get("/v1/programs/qa/examples?version=w2")
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
    assert [r["dspy_fleet"]["job_id"] for r in lines] == ["ver-2"]
    listed = api.get("/v1/programs/qa/traces?version=w1&limit=1").get_json()
    assert listed["count"] == 1 and listed["traces"][0]["job_id"] == "ver-1"  # newest first


def keep_no_lm_text(trace: dict[str, Any]) -> dict[str, Any]:
    """A redaction hook (configured as tests.test_traces:keep_no_lm_text)."""
    return {**trace, "lm_calls": [], "hooked": True}


def broken_hook(trace: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("the hook's own bug, quoting 123")


def test_the_redaction_hook_runs_after_the_fields_and_a_broken_one_drops_the_trace() -> None:
    from types import SimpleNamespace

    from dspy_fleet.contract import JobMessage
    from dspy_fleet.fleet_config import TraceConfig
    from worker import traces

    msg = JobMessage.model_validate({"v": 1, "job_id": "h1", "submitted_at": utcnow().isoformat(),
                                     "inputs": {"question": "q?", "ssn": "123"}})  # fmt: skip
    plan = SimpleNamespace(program="qa", variant=None, inputs={"question": "q?", "ssn": "123"})
    program = SimpleNamespace(version="v1", input_fields=("question", "ssn"),
                              output_fields=("answer",))  # fmt: skip

    def run(hook: str) -> dict[str, str]:
        cfg = TraceConfig(sample_rate=1, sensitive_fields=["ssn"], redact=hook)
        recorder = traces.Recorder(cfg, sampled=True)
        recorder.on_lm_start("c", SimpleNamespace(model="m"), {"messages": [{"content": "123"}]})
        recorder.on_lm_end("c", ["Paris"])
        return traces.fields(recorder, msg, plan, program, status="succeeded",  # type: ignore[arg-type]
                             model="mock", outputs={"answer": "Paris"}, cached=False)  # fmt: skip

    kept = json.loads(run("tests.test_traces:keep_no_lm_text")["trace"])
    assert kept["hooked"] and kept["lm_calls"] == [] and kept["inputs"]["ssn"] == REDACTED
    assert run("tests.test_traces:broken_hook") == {}
