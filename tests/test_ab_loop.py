"""The DSPy loop closed end to end: a program with two variants, 300 jobs, a judge's feedback,
and an A/B report that names the better variant, or says nothing differs yet.

Real processes: Redis, the mock LLM, a Celery worker running DSPy, the API under gunicorn.
The two variants are two saved states of one Predict program (written by ``program.save``)
that differ only in their few-shot demos: ``plain``'s answers are in ordinary case,
``shout``'s in capitals. The mock LLM imitates its demos' casing
(dspy_fleet/devtools/mock_llm/responder.py, ``demo_casing``), so the answers really differ
by variant, through the real prompt the worker's DSPy builds.

Two judges score the same 300 answers, under two feedback sources:

- ``judge-caps`` looks only at the answer: it likes capitals a little (mean score 0.58
  for an answer in capitals, 0.50 otherwise, noise sd 0.2): the report must name
  ``shout`` better, p < 0.05;
- ``judge-fair`` scores every answer alike (mean 0.55, sd 0.2): the report must say there
  is no significant difference.

Both judges draw their noise from seeded generators, over the jobs in custom_id order, and
a job's variant is a hash of its input: the run is the same every time.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from dspy_fleet.client import FleetClient
from dspy_fleet.store.jobs import JobStore
from tests.conftest import MockLLM, OwnStack, running_fleet

JOBS = 300
CONFIG = """
default_model: mock
models:
  mock: {{litellm_model: openai/ab-mock, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}", timeout: 10,
         input_price_per_1k: 0.00015, output_price_per_1k: 0.0006}}
programs:
  qa:
    signature: "question -> answer"
    variants:
      plain: {{weight: 1, state: {plain}}}
      shout: {{weight: 1, state: {shout}}}
"""


def save_state(path: Path, answers: tuple[str, str]) -> None:
    """A Predict program's saved state with two demos, as an optimizer would leave it."""
    import dspy

    program = dspy.Predict("question -> answer")
    program.demos = [
        dspy.Example(question="What is the capital of France?", answer=answers[0]),
        dspy.Example(question="Which ocean is the largest?", answer=answers[1]),
    ]
    program.save(str(path))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, mock_llm: MockLLM) -> Iterator[OwnStack]:
    base = tmp_path_factory.mktemp("ab-loop")
    save_state(base / "plain.json", ("Paris", "The Pacific"))
    save_state(base / "shout.json", ("PARIS", "THE PACIFIC"))
    config = CONFIG.format(plain=base / "plain.json", shout=base / "shout.json")
    with running_fleet(base, config=config, mock=mock_llm) as stack:
        yield stack


@pytest.fixture(scope="module")
def sdk(fleet: OwnStack) -> Iterator[FleetClient]:
    assert fleet.api is not None
    with FleetClient(fleet.api.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def answered(fleet: OwnStack, sdk: FleetClient) -> list[dict[str, Any]]:
    """The 300 jobs run through the fleet: custom_id, job id, answer and variant."""
    items = [{"custom_id": f"q{i:03d}", "program": "qa", "inputs": {"question":
              f"Which city should traveller {i} visit first?"}} for i in range(JOBS)]  # fmt: skip
    created = sdk.batch(items)
    assert not created.errors
    done = sdk.wait_batch(created.id, timeout=50, interval=0.2)
    assert done.counts.succeeded == JOBS, done.counts
    lines = sorted(sdk.batch_results(created.id), key=lambda line: line["custom_id"])
    client = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    pipe = client.pipeline(transaction=False)
    for line in lines:
        pipe.hget(JobStore.key(line["id"]), "variant")
    variants = pipe.execute()
    return [{"custom_id": line["custom_id"], "id": line["id"],
             "answer": line["outputs"]["answer"], "variant": variant}
            for line, variant in zip(lines, variants, strict=True)]  # fmt: skip


def _noisy(rng: random.Random, mean: float) -> float:
    return min(1.0, max(0.0, rng.gauss(mean, 0.2)))


def judge_caps(answers: list[str]) -> list[float]:
    """Likes answers in capitals a little; sees nothing but the answer."""
    rng = random.Random(16)
    return [_noisy(rng, 0.58 if a.isupper() else 0.50) for a in answers]


def judge_fair(answers: list[str]) -> list[float]:
    """Scores every answer alike."""
    rng = random.Random(61)
    return [_noisy(rng, 0.55) for _ in answers]


def post_all(
    sdk: FleetClient, jobs: list[dict[str, Any]], scores: list[float], source: str
) -> None:
    with ThreadPoolExecutor(8) as pool:
        posted = list(pool.map(lambda js: sdk.feedback(js[0]["id"], js[1], source=source),
                               zip(jobs, scores, strict=True)))  # fmt: skip
    assert all(p.source == source and not p.replaced for p in posted)


def test_the_variants_answer_differently_for_real(answered: list[dict[str, Any]]) -> None:
    by_variant: dict[str, list[str]] = {}
    for job in answered:
        by_variant.setdefault(job["variant"], []).append(job["answer"])
    assert set(by_variant) == {"plain", "shout"}
    assert min(len(v) for v in by_variant.values()) > JOBS // 3  # the split is about even
    assert all(a.isupper() for a in by_variant["shout"])
    assert not any(a.isupper() for a in by_variant["plain"])


def test_a_judge_that_favours_one_variant_is_detected_and_a_fair_one_is_not(
    fleet: OwnStack, sdk: FleetClient, answered: list[dict[str, Any]]
) -> None:
    answers = [job["answer"] for job in answered]
    post_all(sdk, answered, judge_caps(answers), "judge-caps")
    post_all(sdk, answered, judge_fair(answers), "judge-fair")

    favoured = sdk.report("qa", source="judge-caps")
    print("judge-caps:", favoured["verdict"], favoured["comparisons"][0]["feedback_score"])
    assert favoured["control"] == "plain"
    figures = favoured["variants"]
    assert figures["plain"]["n"] + figures["shout"]["n"] == JOBS
    for v in figures.values():
        assert v["success_rate"] == 1.0 and v["feedback"]["n"] == v["n"]
        assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p95"]
        assert v["cost_per_request_usd"] > 0
    (cmp,) = favoured["comparisons"]
    assert cmp["primary"] == "feedback_score" and cmp["feedback_score"]["p_value"] < 0.05
    n = f"n = {figures['shout']['feedback']['n']}/{figures['plain']['feedback']['n']}"
    assert favoured["verdict"].startswith("shout better than plain on feedback score, p = ")
    assert favoured["verdict"].endswith(n)

    fair = sdk.report("qa", source="judge-fair")
    print("judge-fair:", fair["verdict"], fair["comparisons"][0]["feedback_score"])
    (cmp,) = fair["comparisons"]
    assert cmp["feedback_score"]["p_value"] >= 0.05
    assert "no significant difference yet on feedback score" in fair["verdict"]
    assert "more jobs needed at this effect size" in fair["verdict"]
    # Both sources at once: two scores per job.
    both = sdk.report("qa")
    assert sum(v["feedback"]["n"] for v in both["variants"].values()) == 2 * JOBS

    # The CLI prints the same verdict, from its own process.
    assert fleet.api is not None
    out = subprocess.run(
        [str(Path(sys.executable).with_name("dspy-fleet")), "report", "qa", "--source",
         "judge-caps", "--url", fleet.api.url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert favoured["verdict"] in out and "shout" in out and "plain" in out


def test_feedback_from_the_cli_replaces_that_sources_earlier_one(
    fleet: OwnStack, sdk: FleetClient, answered: list[dict[str, Any]]
) -> None:
    assert fleet.api is not None
    job = answered[0]["id"]
    cli = [str(Path(sys.executable).with_name("dspy-fleet")), "feedback", job, "0.25",
           "--source", "cli-user", "--label", "wrong", "--url", fleet.api.url]  # fmt: skip
    for _ in range(2):
        subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True)
    mine = [f for f in sdk.get_feedback(job) if f.source == "cli-user"]
    assert len(mine) == 1 and mine[0].score == 0.25 and mine[0].label == "wrong"
