"""Feedback on predictions and the A/B report, at the API: a real redis-server, the real Lua
scripts (jobs are finished by JobStore.finish, as a worker finishes them), Flask's test
client in this process. The end-to-end run with workers and a judge is tests/test_ab_loop.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.auth import hash_key, new_key
from dspy_fleet import abtest
from dspy_fleet.contract import utcnow
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store import ledger
from dspy_fleet.store.feedback import FeedbackStore, Outcome, Score
from dspy_fleet.store.jobs import JobStore

CONFIG = """
default_model: mock
models:
  mock: {litellm_model: openai/mock, api_base: "http://127.0.0.1:9/v1", timeout: 5,
         input_price_per_1k: 0.001, output_price_per_1k: 0.001}
programs:
  qa:
    signature: "question -> answer"
    variants: {a: {weight: 1}, b: {weight: 1}}
  plain: {signature: "question -> answer"}
"""
KEYS = {"alpha": new_key(), "beta": new_key(), "ops": new_key()}
API_KEYS = ",".join(
    f"{t}:{hash_key(k)}" + (":admin" if t == "ops" else "") for t, k in KEYS.items()
)


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(log_path=tmp_path_factory.mktemp("fb") / "redis.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> FlaskClient:
    from api import create_app

    path = tmp_path_factory.mktemp("fbcfg") / "fleet.yaml"
    path.write_text(CONFIG)
    settings = {"redis_url": server.url, "config": str(path), "api_keys": API_KEYS}
    return create_app({"keep_logging": True, "settings": settings}).test_client()


@pytest.fixture(scope="module")
def store(server: RedisServer) -> JobStore:
    return JobStore(redis.Redis.from_url(server.url, decode_responses=True), 3600)


def make_job(
    store: JobStore,
    job_id: str,
    *,
    tenant: str,
    variant: str | None = "a",
    status: str = "succeeded",
    program: str = "qa",
    latency: float = 10.0,
) -> str:
    """A job created queued and finished by the finish script, as the worker does."""
    store.create(job_id, {"program": program, "variant": variant, "tenant": tenant,
                          "model": "mock"})  # fmt: skip
    if status == "queued":
        return job_id
    cost = {"model": "mock", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.000015,
            "cached": False, "latency_ms": latency, "attempts": 1}  # fmt: skip
    bill = ledger.make_bill(cost, status=status, dims=("mock", variant or "none", program,
                                                       tenant), day=utcnow().date())  # fmt: skip
    fields: dict[str, Any] = {"status": status, "cost": cost, "finished_at": utcnow()}
    if status == "succeeded":
        fields["outputs"] = {"answer": "x"}
    assert store.finish(job_id, fields, bill=bill) == 1
    return job_id


def error_of(resp: Any) -> dict[str, Any]:
    body = resp.get_json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "details", "request_id"} <= set(body["error"])
    return body["error"]


def test_feedback_is_stored_replaced_per_source_and_listed(
    client: FlaskClient, store: JobStore
) -> None:
    job = make_job(store, "fb-1", tenant="alpha")
    url = f"/v1/predictions/{job}/feedback"
    first = client.post(url, json={"score": 0.2, "label": "meh"}, headers=auth("alpha"))
    assert first.status_code == 201, first.get_json()
    assert first.get_json()["replaced"] is False
    assert first.get_json()["variant"] == "a" and first.get_json()["source"] == "default"
    again = client.post(url, json={"score": 0.9, "comment": "on reflection, good"},
                        headers=auth("alpha"))  # fmt: skip
    assert again.status_code == 200 and again.get_json()["replaced"] is True
    other = client.post(url, json={"score": 1, "source": "judge-1",
                                   "expected": {"answer": "x"}}, headers=auth("alpha"))  # fmt: skip
    assert other.status_code == 201
    listed = client.get(url, headers=auth("alpha")).get_json()["feedback"]
    by_source = {f["source"]: f for f in listed}
    assert set(by_source) == {"default", "judge-1"}
    # Replaced: the second post's body, not a merge with the first.
    assert by_source["default"]["score"] == 0.9 and "label" not in by_source["default"]
    assert by_source["judge-1"]["expected"] == {"answer": "x"}
    # The report counts one score per source: 0.9 and 1.0, never the replaced 0.2.
    report = client.get("/v1/programs/qa/report?source=default", headers=auth("alpha")).get_json()
    assert report["variants"]["a"]["feedback"] == {"n": 1, "mean_score": 0.9}


def test_tenants_see_only_their_own_feedback_and_an_admin_sees_all(
    client: FlaskClient, store: JobStore
) -> None:
    job = make_job(store, "fb-2", tenant="alpha")
    url = f"/v1/predictions/{job}/feedback"
    assert client.post(url, json={"score": 1}, headers=auth("alpha")).status_code == 201
    # beta can neither judge nor read alpha's prediction: as if it did not exist.
    for resp in (client.post(url, json={"score": 0}, headers=auth("beta")),
                 client.get(url, headers=auth("beta"))):  # fmt: skip
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    admin = client.get(url, headers=auth("ops"))
    assert admin.status_code == 200 and [f["score"] for f in admin.get_json()["feedback"]] == [1]
    assert client.post(url, json={"score": 0.5, "source": "ops-review"},
                       headers=auth("ops")).status_code == 201  # fmt: skip
    # Reports: beta's jobs only for beta, alpha's for alpha, everyone's for the admin.
    make_job(store, "fb-2b", tenant="beta", variant="b")
    seen = {}
    for who in ("alpha", "beta", "ops"):
        body = client.get("/v1/programs/qa/report", headers=auth(who)).get_json()
        seen[who] = {v: f["n"] for v, f in body["variants"].items()}
    ids_alpha = client.get("/v1/programs/qa/report", headers=auth("alpha")).get_json()
    assert seen["beta"] == {"a": 0, "b": 1}
    assert seen["alpha"]["b"] == 0 and seen["alpha"]["a"] >= 2
    assert seen["ops"]["a"] == seen["alpha"]["a"] and seen["ops"]["b"] >= 1
    assert ids_alpha["variants"]["a"]["feedback"]["n"] >= 2  # ops's feedback on alpha's job


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "score"), ({"score": "1"}, "score"), ({"score": True}, "score"),
     ({"score": 1, "source": "a b"}, "source"), ({"score": 1, "extra": 1}, "extra"),
     ({"score": 1, "expected": "x"}, "expected"), ({"score": 1e13}, "score")],
)  # fmt: skip
def test_bad_bodies_are_422_in_the_one_error_shape(
    client: FlaskClient, store: JobStore, body: dict[str, Any], field: str
) -> None:
    job = make_job(store, f"fb-bad-{field}-{len(str(body))}", tenant="alpha")
    resp = client.post(f"/v1/predictions/{job}/feedback", json=body, headers=auth("alpha"))
    assert resp.status_code == 422
    err = error_of(resp)
    assert err["code"] == "validation_error"
    assert field in {e["field"] for e in err["details"]["errors"]}


def test_unknown_unfinished_and_failed_predictions_refuse_feedback(
    client: FlaskClient, store: JobStore
) -> None:
    resp = client.post("/v1/predictions/nope/feedback", json={"score": 1}, headers=auth("alpha"))
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    for status in ("queued", "failed"):
        job = make_job(store, f"fb-{status}", tenant="alpha", status=status)
        resp = client.post(f"/v1/predictions/{job}/feedback", json={"score": 1},
                           headers=auth("alpha"))  # fmt: skip
        assert resp.status_code == 409
        err = error_of(resp)
        assert err["code"] == "not_succeeded" and err["details"]["status"] == status
        assert client.get(f"/v1/predictions/{job}/feedback",
                          headers=auth("alpha")).get_json()["feedback"] == []  # fmt: skip
    resp = client.post("/v1/predictions/x/feedback", data=b"{", headers=auth("alpha"))
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"


def test_report_checks_its_parameters_and_window(client: FlaskClient, store: JobStore) -> None:
    resp = client.get("/v1/programs/nope/report", headers=auth("ops"))
    assert resp.status_code == 404 and error_of(resp)["code"] == "unknown_program"
    for query, field in (("since=yesterday", "since"), ("control=zz", "control"),
                         ("source=a%20b", "source")):  # fmt: skip
        resp = client.get(f"/v1/programs/qa/report?{query}", headers=auth("ops"))
        assert resp.status_code == 422, query
        assert error_of(resp)["details"]["errors"][0]["field"] == field
    # A program without variants reports its one arm, "none".
    body = client.get("/v1/programs/plain/report?since=2026-01-01", headers=auth("ops")).get_json()
    assert list(body["variants"]) == ["none"] and "nothing to compare" in body["verdict"]
    # The window: jobs finished since `since` only.
    make_job(store, "window-1", tenant="alpha")
    now = client.get("/v1/programs/qa/report", headers=auth("ops")).get_json()
    later = client.get("/v1/programs/qa/report?since=2999-01-01T00:00:00Z", headers=auth("ops"))
    assert now["variants"]["a"]["n"] >= 1
    assert {v["n"] for v in later.get_json()["variants"].values()} == {0}


def test_failed_jobs_count_in_the_success_rate_and_latency(
    client: FlaskClient, store: JobStore
) -> None:
    kw: dict[str, Any] = {"tenant": "beta", "program": "plain", "variant": None}
    make_job(store, "sr-1", status="failed", latency=300.0, **kw)
    make_job(store, "sr-2", latency=100.0, **kw)
    make_job(store, "sr-3", status="queued", **kw)  # not finished: no sample
    body = client.get("/v1/programs/plain/report", headers=auth("beta")).get_json()
    arm = body["variants"]["none"]
    assert (arm["n"], arm["succeeded"], arm["success_rate"]) == (2, 1, 0.5)
    assert arm["latency_ms"] == {"p50": 200.0, "p95": 290.0}
    assert arm["cost_per_request_usd"] == pytest.approx(0.000015)


def test_feedback_metrics_by_program_and_variant(client: FlaskClient, store: JobStore) -> None:
    job = make_job(store, "fb-metrics", tenant="alpha", variant="b")
    client.post(f"/v1/predictions/{job}/feedback", json={"score": 0.35}, headers=auth("alpha"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'dspy_feedback_total{program="qa",variant="b"}' in text
    assert 'dspy_feedback_score_bucket{le="0.4",program="qa",variant="b"}' in text


def test_outcomes_and_feedback_are_trimmed_to_their_cap(server: RedisServer) -> None:
    """The retention's size cap, on a copy of the scripts with a cap of 3."""
    from dspy_fleet.store import feedback

    client = redis.Redis.from_url(server.url, decode_responses=True)
    cap_store = FeedbackStore(client)
    cap_store._post = client.register_script(feedback._POST)
    jobs = JobStore(client, 3600)
    for i in range(5):
        make_job(jobs, f"cap-{i}", tenant="t", program="capped")
        out = cap_store._post(
            keys=[JobStore.key(f"cap-{i}"), feedback.FEEDBACK_PREFIX + "capped",
                  feedback.SCORES_PREFIX + "capped"],
            args=[f"cap-{i}", "s", "{}", "1.0", feedback.KEEP_SECONDS, 3, 100, "succeeded"],
        )  # fmt: skip
        assert out[0] == "ok"
    assert client.zcard(feedback.FEEDBACK_PREFIX + "capped") == 3
    assert sorted(client.hkeys(feedback.SCORES_PREFIX + "capped")) == [
        "cap-2|s", "cap-3|s", "cap-4|s"]  # fmt: skip
    assert 0 < client.ttl(feedback.OUTCOMES_PREFIX + "capped") <= feedback.KEEP_SECONDS


# -- the statistics (dspy_fleet/abtest.py), on samples made up here ---------------------------


def _outcomes(variant: str, n: int, ok: int) -> list[Outcome]:
    return [Outcome(f"{variant}{i}", variant, "succeeded" if i < ok else "failed", 10.0, None,
                    False, "t") for i in range(n)]  # fmt: skip


def test_verdict_names_the_better_variant_or_how_many_more_jobs() -> None:
    scores = [Score(f"a{i}", "j", 0.4 + 0.01 * (i % 5), "a", "t") for i in range(100)]
    scores += [Score(f"b{i}", "j", 0.5 + 0.01 * (i % 5), "b", "t") for i in range(90)]
    out = abtest.report(_outcomes("a", 100, 100) + _outcomes("b", 90, 90), scores)
    assert out["verdict"].startswith("b better than a on feedback score, p = ")
    assert out["verdict"].endswith("n = 90/100")
    # Success rates 90% vs 88% on 100 jobs each: far from significant; the estimate of
    # jobs still needed is statsmodels' NormalIndPower at Cohen's h, minus the 200 run.
    out = abtest.report(_outcomes("a", 100, 90) + _outcomes("b", 100, 88), [])
    (cmp,) = out["comparisons"]
    assert cmp["primary"] == "success_rate" and cmp["success_rate"]["p_value"] > 0.05
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    per_arm = NormalIndPower().solve_power(abs(proportion_effectsize(0.88, 0.9)), alpha=0.05,
                                           power=0.8, ratio=1.0)  # fmt: skip
    expected = -(-int(per_arm * 2 * 1000) // 1000) - 200
    assert abs(cmp["success_rate"]["more_jobs_needed"] - expected) <= 1
    assert f"about {cmp['success_rate']['more_jobs_needed']} more jobs needed" in out["verdict"]


LAZY_PROBE = """
import json, sys, time
import redis
from api import create_app
settings = {"redis_url": sys.argv[1], "config": sys.argv[2]}
app = create_app({"keep_logging": True, "settings": settings})
r = redis.Redis.from_url(sys.argv[1])
for i, v in enumerate("aabb"):  # two samples per variant: enough to compare
    r.zadd("dspy_fleet:outcomes:qa", {f"probe-{i}|{v}|succeeded|5.0||0|t": time.time()})
client = app.test_client()
client.get('/health')
before = sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'statsmodels'))
started = time.perf_counter()
assert client.get('/v1/programs/qa/report').status_code == 200
first = time.perf_counter() - started
after = {m.split('.')[0] for m in sys.modules} & {'scipy', 'statsmodels'}
print(json.dumps({"before": before, "after": sorted(after), "first_report_s": first}))
"""


def test_the_api_loads_the_statistics_on_the_first_report_only(
    server: RedisServer, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "fleet.yaml").write_text(CONFIG)
    argv = [sys.executable, "-c", LAZY_PROBE, server.url, str(tmp_path / "fleet.yaml")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("first report, with the statistics' imports:", round(out["first_report_s"], 2), "s")
    assert out["before"] == [] and out["after"] == ["scipy", "statsmodels"]
