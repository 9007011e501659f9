"""The DSPy loop's round trip, on real processes (Redis, the mock LLM, a Celery worker
running DSPy, the API under gunicorn, the CLI in its own process):

collect (jobs run; their traces are kept when feedback arrives) → export (``dspy-fleet
examples export``) → compile (``dspy.LabeledFewShot`` in this process, from the exported
file) → ``program.save()`` → the saved state deployed as variant ``b`` → a job routed to
``b`` serves, and its answer shows the new demos' effect.

The reviewers' ``expected`` answers are in capitals; the mock LLM imitates its demos'
casing (dspy_fleet/devtools/mock_llm/responder.py, ``demo_casing``), so only a program
whose demos came from the export answers in capitals.

Also here, on the same stack: tenants see their own traces and examples only (an admin
everyone's); a field marked sensitive never reaches Redis, the API or the logs; sampling
keeps the sampled share and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.auth import new_key
from dspy_fleet.client import FleetClient, NotFoundError
from dspy_fleet.store.traces import TraceStore
from tests.conftest import MockLLM, OwnStack, running_fleet

CONFIG = """
default_model: mock
models:
  mock: {{litellm_model: openai/rt-mock, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}", timeout: 10}}
programs:
  qa:
    signature: "question -> answer"
    variants:
      a: {{weight: 1}}{variant_b}
    traces: {{sample_rate: 0}}
  sampled:
    signature: "question -> answer"
    traces: {{sample_rate: 0.5, keep_on_feedback: false}}
  secret:
    signature: "ssn, question -> answer"
    traces: {{sample_rate: 1, sensitive_fields: [ssn]}}
"""
SSN = "987-65-4321"
KEYS = {"alpha": new_key(), "beta": new_key(), "ops": new_key()}
CLI = str(Path(sys.executable).with_name("dspy-fleet"))


def write_config(path: Path, state: Path | None = None) -> None:
    variant_b = f"\n      b: {{weight: 1, state: {state}}}" if state is not None else ""
    path.write_text(CONFIG.format(variant_b=variant_b))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, mock_llm: MockLLM) -> Iterator[OwnStack]:
    with running_fleet(tmp_path_factory.mktemp("round-trip"), config=CONFIG.format(variant_b=""),
                       keys=KEYS, admins={"ops"}, mock=mock_llm) as stack:  # fmt: skip
        yield stack


def sdk(fleet: OwnStack, tenant: str) -> FleetClient:
    assert fleet.api is not None
    return FleetClient(fleet.api.url, api_key=KEYS[tenant], timeout=30)


def ask(client: FleetClient, program: str, i: int, **fields: Any) -> str:
    inputs = {"question": f"Which city should traveller {i} visit first?", **fields}
    done = client.submit(program=program, inputs=inputs, wait=30, use_cache=False)
    assert done.status == "succeeded", done
    return done.id


@pytest.fixture(scope="module")
def collected(fleet: OwnStack) -> dict[str, list[str]]:
    """qa jobs by two tenants, some judged: alpha's first four with an expected answer in
    capitals and a good score, its fifth with a bad score only, its sixth not at all;
    beta's one job judged."""
    with sdk(fleet, "alpha") as alpha, sdk(fleet, "beta") as beta:
        ids = [ask(alpha, "qa", i) for i in range(6)]
        for i, job in enumerate(ids[:4]):
            alpha.feedback(job, 0.9, source="review",
                           expected={"answer": f"CITY NUMBER {i}"})  # fmt: skip
        alpha.feedback(ids[4], 0.1, source="review")
        theirs = ask(beta, "qa", 100)
        beta.feedback(theirs, 0.8, source="review", expected={"answer": "BETA CITY"})
    return {"alpha": ids, "beta": [theirs]}


def export(fleet: OwnStack, tenant: str, out: Path, *args: str) -> list[dict[str, Any]]:
    assert fleet.api is not None
    run = subprocess.run(
        [CLI, "examples", "export", "qa", "-o", str(out), "--url", fleet.api.url,
         "--api-key", KEYS[tenant], *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "with_inputs('question')" in run.stderr  # the CLI says how to load them
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_only_jobs_with_feedback_are_kept_at_a_zero_sample_rate(
    fleet: OwnStack, collected: dict[str, list[str]]
) -> None:
    traces = TraceStore(redis.Redis.from_url(fleet.redis_url, decode_responses=True))
    alpha = collected["alpha"]
    assert all(traces.get(job) is not None for job in alpha[:5])
    assert traces.get(alpha[5]) is None and traces.pending(alpha[5])  # waits for feedback
    kept = traces.get(alpha[0])
    assert kept is not None
    trace = kept["trace"]
    assert trace["inputs"] == {"question": "Which city should traveller 0 visit first?"}
    assert trace["variant"] == "a" and len(trace["program_version"]) == 16
    (call,) = trace["lm_calls"]  # the LM call, as DSPy sent it and the mock answered
    assert any("traveller 0" in str(m.get("content")) for m in call["messages"])
    assert trace["outputs"]["answer"] in str(call["outputs"])
    assert [f["expected"] for f in kept["feedback"]] == [{"answer": "CITY NUMBER 0"}]


def test_tenants_see_only_their_own_traces_and_examples(
    fleet: OwnStack, collected: dict[str, list[str]], tmp_path: Path
) -> None:
    mine = {r["dspy_fleet"]["job_id"] for r in export(fleet, "alpha", tmp_path / "a.jsonl")}
    assert mine == set(collected["alpha"][:5])
    theirs = export(fleet, "beta", tmp_path / "b.jsonl")
    assert [r["dspy_fleet"]["job_id"] for r in theirs] == collected["beta"]
    everyone = {r["dspy_fleet"]["job_id"] for r in export(fleet, "ops", tmp_path / "o.jsonl")}
    assert everyone == mine | set(collected["beta"])
    with sdk(fleet, "beta") as beta, sdk(fleet, "alpha") as alpha, sdk(fleet, "ops") as ops:
        assert {t["job_id"] for t in beta.traces("qa")} == set(collected["beta"])
        assert len(ops.traces("qa")) == 6
        with pytest.raises(NotFoundError):
            beta.trace(collected["alpha"][0])
        assert alpha.trace(collected["alpha"][0])["job_id"] == collected["alpha"][0]
    assert fleet.api is not None
    cli = subprocess.run([CLI, "traces", "qa", "--url", fleet.api.url, "--api-key", KEYS["beta"]],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert [json.loads(line)["job_id"] for line in cli.stdout.splitlines()] == collected["beta"]


def test_export_then_compile_then_deploy_as_variant_b(
    fleet: OwnStack, collected: dict[str, list[str]], tmp_path: Path
) -> None:
    import dspy

    records = export(fleet, "alpha", tmp_path / "train.jsonl", "--min-score", "0.5")
    assert len(records) == 4  # the bad score and the unjudged job are left out
    assert {r["answer"] for r in records} == {f"CITY NUMBER {i}" for i in range(4)}
    assert all(r["dspy_score"] == 0.9 and r["dspy_fleet"]["label"] == "expected" for r in records)
    every = export(fleet, "alpha", tmp_path / "all.jsonl")
    (bad,) = [r for r in every if r["dspy_score"] == 0.1]
    assert bad["dspy_fleet"]["label"] == "production"  # no expected: the model's answer

    # The loader the README shows, then an optimizer and the saved state.
    trainset = [dspy.Example(**json.loads(line)).with_inputs("question")
                for line in (tmp_path / "train.jsonl").read_text().splitlines()]  # fmt: skip
    assert trainset[0].labels().keys() == ["answer"]  # the metadata stays out of the labels
    compiled = dspy.LabeledFewShot(k=4).compile(dspy.Predict("question -> answer"),
                                                trainset=trainset)  # fmt: skip
    state = tmp_path / "qa-b.json"
    compiled.save(str(state))

    # Deploy: the state as variant b; the worker and the API read the new config.
    write_config(Path(fleet.workdir) / "fleet.yaml", state)
    with fleet.together():
        fleet.restart(fleet.workers[0].name)
        fleet.restart("api")
    with sdk(fleet, "alpha") as alpha:
        b = alpha.submit(program="qa", variant="b", wait=30, use_cache=False,
                         inputs={"question": "Which river is the longest?"})  # fmt: skip
        a = alpha.submit(program="qa", variant="a", wait=30, use_cache=False,
                         inputs={"question": "Which river is the longest?"})  # fmt: skip
        assert fleet.api is not None
        auth = {"Authorization": f"Bearer {KEYS['alpha']}"}
        catalog = httpx.get(f"{fleet.api.url}/v1/programs", headers=auth).json()
    assert b.status == a.status == "succeeded"
    assert b.variant == "b" and b.outputs["answer"].isupper()  # the demos' casing
    assert not a.outputs["answer"].isupper()
    assert b.program_version != a.program_version
    # The catalog lists b with the version that served it: traces and examples of b's
    # jobs carry it, so the next export can be filtered to it (--version).
    (qa,) = [p for p in catalog["programs"] if p["name"] == "qa"]
    assert {v["name"]: v["version"] for v in qa["variants"]}["b"] == b.program_version


def test_a_sensitive_field_never_reaches_redis_the_api_or_the_logs(fleet: OwnStack) -> None:
    with sdk(fleet, "alpha") as alpha:
        job = ask(alpha, "secret", 7, ssn=SSN)
        trace = alpha.trace(job)
        assert trace["inputs"]["ssn"] == "[redacted]" and trace["redacted"] == ["ssn"]
        # DSPy put the value in the prompt: the stored messages hold the mark instead.
        assert "[redacted]" in json.dumps(trace["lm_calls"])
        assert SSN not in json.dumps(trace)
        assert SSN not in json.dumps(alpha.traces("secret"))
    client = redis.Redis.from_url(fleet.redis_url)
    for key in client.scan_iter(match=b"dspy_fleet:*"):
        assert SSN.encode() not in client.dump(key), key
    for log in Path(fleet.workdir).glob("*.log"):
        assert SSN not in log.read_text(errors="replace"), log


def test_a_sample_rate_between_none_and_all_keeps_about_that_share(fleet: OwnStack) -> None:
    with sdk(fleet, "alpha") as alpha:
        ids = [ask(alpha, "sampled", i) for i in range(40)]
    traces = TraceStore(redis.Redis.from_url(fleet.redis_url, decode_responses=True))
    kept = [job for job in ids if traces.get(job) is not None]
    # 40 draws at 0.5: outside 8..32 with probability < 1e-4.
    assert 8 <= len(kept) <= 32, len(kept)
    assert not any(traces.pending(job) for job in ids)  # keep_on_feedback off: none parked
