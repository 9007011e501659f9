"""Tenant quotas and budgets: a tenant that spent its budget stops being served, and no one else
notices.

A real fleet: Redis, the mock LLM, two worker processes and the API with API keys for four
tenants. Each tenant's jobs run on a model of its own name at the mock, so "no provider call
for a refused job" is a count of the HTTP requests the provider received, not a field the fleet
reports about itself.

- ``alpha``: a $0.50 monthly budget; every job costs the same (equal-length inputs at fixed
  prices), just under $0.05.
- ``beta``: a large budget, in the same burst: unaffected.
- ``gamma``: 5 requests per day.
- ``ops``: an admin key (sees every tenant's usage).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.auth import new_key
from dspy_fleet.contract import utcnow
from dspy_fleet.errors import BudgetExhaustedError, ConfigError, QuotaExceededError, Throttled
from dspy_fleet.fleet_config import TenantQuota, load_fleet_config
from dspy_fleet.store import ledger
from dspy_fleet.store.jobs import KEY_PREFIX, JobStore
from dspy_fleet.store.ledger import NANO
from dspy_fleet.store.quotas import CALENDAR, QuotaBook, resets
from tests.conftest import OwnStack, poll, running_fleet

BUDGET = 0.50
# USD per 1K tokens: an alpha job (184 tokens at the mock) costs $0.04968, so 10 jobs stay
# under the budget and the 11th passes it (the one job the bound allows).
PRICE = 0.27
CONFIG = f"""
default_model: alpha-model
models:
  alpha-model: {{litellm_model: openai/budget-alpha, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}",
                timeout: 10, input_price_per_1k: {PRICE}, output_price_per_1k: {PRICE}}}
  beta-model: {{litellm_model: openai/budget-beta, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}",
               timeout: 10, input_price_per_1k: {PRICE}, output_price_per_1k: {PRICE}}}
  gamma-model: {{litellm_model: openai/budget-gamma, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}",
                timeout: 10, input_price_per_1k: 0.001, output_price_per_1k: 0.001}}
programs:
  qa: {{signature: "question -> answer"}}
tenants:
  alpha: {{usd_per_month: {BUDGET}}}
  beta: {{usd_per_month: 1000, tokens_per_day: 2e6}}
  gamma: {{requests_per_day: 5}}
"""
KEYS = {"alpha": new_key(), "beta": new_key(), "gamma": new_key(), "ops": new_key()}
ALPHA_JOBS = 100
BETA_JOBS = 20


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    # Calls take 100 ms, so that many of a tenant's jobs are in flight at once: the
    # check-then-call race the bound is about.
    with running_fleet(tmp_path_factory.mktemp("budgets"), config=CONFIG, keys=KEYS,
                       admins={"ops"}, mock_latency_ms=100, workers=2) as stack:  # fmt: skip
        yield stack


@pytest.fixture
def r(fleet: OwnStack) -> redis.Redis:
    return redis.Redis.from_url(fleet.redis_url, decode_responses=True)


def http(fleet: OwnStack, tenant: str) -> httpx.Client:
    assert fleet.api is not None
    return httpx.Client(base_url=fleet.api.url, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS[tenant]}"})  # fmt: skip


def calls(fleet: OwnStack, model: str) -> int:
    """Chat completions the mock answered for ``model``."""
    return int(fleet.mock.stats()["by_model"].get(model, 0))


def nusd(cost: dict[str, Any] | None) -> int:
    """A cost record's USD as the ledger sums it (integer nano-USD)."""
    return round(float((cost or {}).get("cost_usd") or 0) * NANO)


def submit_all(
    fleet: OwnStack, requests: list[tuple[str, str]]
) -> list[tuple[str, httpx.Response]]:
    """POST /v1/predict for every (tenant, input) at once, 32 in flight."""

    clients = {tenant: http(fleet, tenant) for tenant in {t for t, _ in requests}}

    def one(item: tuple[str, str]) -> tuple[str, httpx.Response]:
        tenant, text = item
        body = {"input": text, "model": f"{tenant}-model"}
        return tenant, clients[tenant].post("/v1/predict", json=body)

    try:
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, requests))
    finally:
        for client in clients.values():
            client.close()


def finished(fleet: OwnStack, tenant: str, ids: list[str]) -> list[dict[str, Any]]:
    with http(fleet, tenant) as client:

        def ended() -> list[dict[str, Any]] | None:
            jobs = [client.get(f"/v1/predictions/{i}").json() for i in ids]
            ok = all(j["status"] in ("succeeded", "failed") for j in jobs)
            return jobs if ok else None

        jobs: list[dict[str, Any]] = poll(ended, timeout=25, interval=0.5)
        return jobs


def test_a_tenant_over_budget_stops_being_served_and_others_are_not(
    fleet: OwnStack, r: redis.Redis
) -> None:
    before = {m: calls(fleet, m) for m in ("budget-alpha", "budget-beta")}
    # Equal-length inputs: every job has the same tokens, so the same cost.
    burst = [("alpha", f"budget question {i:04d} {uuid.uuid4().hex}") for i in range(ALPHA_JOBS)]
    burst += [("beta", f"budget question {i:04d} {uuid.uuid4().hex}") for i in range(BETA_JOBS)]
    burst.sort(key=lambda item: item[1][-4:])  # the tenants' requests interleaved
    sent = datetime.now(UTC)
    answers = submit_all(fleet, burst)
    answered = datetime.now(UTC)

    accepted: dict[str, list[str]] = {"alpha": [], "beta": []}
    refused = []
    for tenant, resp in answers:
        if resp.status_code == 429:
            refused.append((tenant, resp))
        else:
            assert resp.status_code == 202, resp.text
            accepted[tenant].append(resp.json()["id"])
    # The other tenant: every job accepted and served by its own model.
    assert not [t for t, _ in refused if t != "alpha"]
    beta = finished(fleet, "beta", accepted["beta"])
    assert [j["status"] for j in beta] == ["succeeded"] * BETA_JOBS
    assert calls(fleet, "budget-beta") - before["budget-beta"] == BETA_JOBS
    # Refused at submission: 429 quota_exceeded naming the quota, with Retry-After until
    # the first of next month (UTC), nothing queued.
    for _, resp in refused:
        error = resp.json()["error"]
        assert error["code"] == "quota_exceeded" and error["details"]["quota"] == "usd_per_month"
        retry_after = int(resp.headers["Retry-After"])
        month_end = resets(sent.timestamp())["month"]
        assert error["details"]["resets_at"] == month_end.isoformat().replace("+00:00", "Z")
        assert (month_end - answered).total_seconds() - 1 <= retry_after
        assert retry_after <= (month_end - sent).total_seconds() + 1

    alpha = finished(fleet, "alpha", accepted["alpha"])
    # A refused request left nothing behind: the only job records of the tenant are the
    # accepted ones.
    records = [
        k
        for k in r.scan_iter(match=KEY_PREFIX + "*", count=1000)
        if ":" not in k[len(KEY_PREFIX) :]
    ]
    pipe = r.pipeline(transaction=False)
    for key in records:
        pipe.hget(key, "tenant")
    owned = {
        k[len(KEY_PREFIX) :] for k, t in zip(records, pipe.execute(), strict=True) if t == "alpha"
    }
    assert owned == set(accepted["alpha"])
    served = [j for j in alpha if j["status"] == "succeeded"]
    stopped = [j for j in alpha if j["status"] == "failed"]
    assert len(served) + len(stopped) + len(refused) == ALPHA_JOBS
    # Jobs beyond the budget: failed with budget_exhausted, billed nothing, and never
    # reached the provider (its request count is exactly the jobs served).
    assert stopped or refused
    for job in stopped:
        assert job["error"]["code"] == "budget_exhausted", job["error"]
        assert job["cost"]["cost_usd"] == 0 and job["cost"]["input_tokens"] == 0
    assert calls(fleet, "budget-alpha") - before["budget-alpha"] == len(served)

    # The bound: spend reached the budget, and passed it by less than one job's cost.
    costs = [nusd(j["cost"]) for j in served]
    assert len(set(costs)) == 1, costs  # every job cost the same
    spent = sum(costs)
    assert BUDGET * NANO <= spent < BUDGET * NANO + max(costs)
    assert len(served) == math.ceil(BUDGET * NANO / costs[0])  # the jobs the budget allows

    # /v1/usage and /costs show the same spend as the cost records, and the limit.
    with http(fleet, "alpha") as client:
        usage = client.get("/v1/usage").json()
        assert usage["tenant"] == "alpha"
        assert round(usage["usd_this_month"]["used"] * NANO) == spent
        assert usage["usd_this_month"]["limit"] == BUDGET
        assert usage["requests_today"]["used"] == len(accepted["alpha"])
        assert usage["requests_today"]["limit"] is None
        assert usage["usd_this_month"]["resets_at"].endswith("-01T00:00:00Z")
        costs_view = client.get("/costs").json()
        assert round(costs_view["by_tenant"]["alpha"]["cost_usd"] * NANO) == spent
        assert costs_view["by_tenant"]["alpha"]["limits"]["usd_per_month"] == BUDGET
        assert costs_view["budgets"]["alpha"]["usd_this_month"]["used"] == usage[
            "usd_this_month"]["used"]  # fmt: skip
        assert "beta" not in costs_view["budgets"]  # a tenant sees only its own
        # Once spent, the next request is refused before it is queued.
        again = client.post("/v1/predict", json={"input": "one more?", "model": "alpha-model"})
        assert again.status_code == 429 and again.json()["error"]["code"] == "quota_exceeded"
        assert client.get("/v1/usage", params={"tenant": "beta"}).status_code == 403
    with http(fleet, "ops") as admin:
        every = admin.get("/v1/usage", params={"all": "true"}).json()["tenants"]
        assert {"alpha", "beta", "gamma"} <= set(every)
        beta_spent = sum(nusd(j["cost"]) for j in beta)
        assert round(every["beta"]["usd_this_month"]["used"] * NANO) == beta_spent
        tokens = sum(j["cost"]["input_tokens"] + j["cost"]["output_tokens"] for j in beta)
        assert every["beta"]["tokens_today"]["used"] == tokens
        assert every["beta"]["tokens_today"]["limit"] == 2_000_000


def test_requests_per_day_quota(fleet: OwnStack) -> None:
    with http(fleet, "gamma") as client:
        rid = uuid.uuid4().hex
        first = client.post("/v1/predict", json={"input": "q0", "model": "gamma-model",
                                                 "request_id": rid})  # fmt: skip
        replay = client.post("/v1/predict", json={"input": "q0", "model": "gamma-model",
                                                  "request_id": rid})  # fmt: skip
        assert first.status_code in (200, 202) and replay.json()["id"] == first.json()["id"]
        batch = [{"custom_id": f"c{i}", "input": f"q{i}", "model": "gamma-model"}
                 for i in range(1, 4)]  # fmt: skip
        assert client.post("/v1/batches", json=batch).status_code == 202
        # The replay was not a new request: 4 counted, one left.
        counted = client.get("/v1/usage").json()["requests_today"]
        assert (counted["used"], counted["limit"]) == (4, 5)
        two = [{"custom_id": c, "input": c, "model": "gamma-model"} for c in ("x", "y")]
        over = client.post("/v1/batches", json=two)
        assert over.status_code == 429, over.text
        details = over.json()["error"]["details"]
        assert details["quota"] == "requests_per_day" and details["requested"] == 2
        last = client.post("/v1/predict", json={"input": "q5", "model": "gamma-model"})
        assert last.status_code in (200, 202), last.text
        refused = client.post("/v1/predict", json={"input": "q6", "model": "gamma-model"})
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded" and error["details"]["quota"] == "requests_per_day"
        assert error["details"]["used"] == 5 and error["details"]["limit"] == 5
        midnight = resets(datetime.now(UTC).timestamp())["day"]
        to_midnight = (midnight - datetime.now(UTC)).total_seconds()
        assert abs(int(refused.headers["Retry-After"]) - to_midnight) < 5
        assert error["details"]["resets_at"] == midnight.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("quota", "value"),
    [("usd_per_month", -0.5), ("requests_per_day", -1), ("tokens_per_day", -10)],
)
def test_a_negative_quota_is_refused_naming_the_key(
    tmp_path: Path, quota: str, value: float
) -> None:
    bad = CONFIG.replace("gamma: {requests_per_day: 5}", f"team-a: {{{quota}: {value}}}")
    (tmp_path / "fleet.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=rf"tenants\.team-a\.{quota}.*greater than or equal to 0"):
        load_fleet_config(tmp_path / "fleet.yaml")


def test_the_calendar_in_lua_agrees_with_python(r: redis.Redis) -> None:
    days = [date(1970, 1, 1), date(2000, 2, 29), date(2024, 12, 31), date(2025, 1, 1),
            date(2026, 2, 28), date(2026, 3, 1), date(2100, 3, 1)]  # fmt: skip
    days += [date(2026, 1, 1) + timedelta(n) for n in range(0, 800, 7)]
    script = CALENDAR + "return {periods(tonumber(ARGV[1]) * 86400 + 43200)}"
    for day in days:
        n = (day - date(1970, 1, 1)).days
        assert r.eval(script, 0, n) == [day.isoformat(), day.isoformat()[:7]]


def test_reservations_make_the_bound(fleet: OwnStack, r: redis.Redis) -> None:
    """The budget check on the real Redis: until a model's price is known its calls go one
    at a time; then a call goes while spend + calls in flight + its own fit the budget,
    waits while they do not, and fails once spend has reached it."""
    tenant = f"unit-{uuid.uuid4().hex[:6]}"
    book = QuotaBook(r, {tenant: TenantQuota(usd_per_month=0.10)})
    store = JobStore(r, 3600)
    assert book.reserve(tenant, "j1", "m", 60)
    with pytest.raises(Throttled):
        book.reserve(tenant, "j2", "m", 60)  # nothing known of m's price yet

    def finish(job: str, usd: float) -> None:
        cost = {"input_tokens": 10, "output_tokens": 5, "cost_usd": usd}
        bill = ledger.make_bill(cost, status="succeeded", dims=("m", "none", "qa", tenant),
                                day=utcnow().date())  # fmt: skip
        assert store.finish(job, {"status": "succeeded", "cost": cost}, bill=bill) == 1

    finish("j1", 0.03)
    assert book.reserve(tenant, "j2", "m", 60)  # 0.03 + 0.03 <= 0.10
    assert book.reserve(tenant, "j3", "m", 60)  # 0.03 + 0.06 <= 0.10
    with pytest.raises(Throttled):
        book.reserve(tenant, "j4", "m", 60)  # 0.03 + 0.06 + 0.03 > 0.10
    book.release(tenant, "j3")
    assert book.reserve(tenant, "j4", "m", 60)
    finish("j2", 0.03)
    finish("j4", 0.03)
    assert book.reserve(tenant, "j5", "m", 60)  # 0.09 spent, nothing in flight: one more
    finish("j5", 0.03)
    with pytest.raises(BudgetExhaustedError) as exc:
        book.reserve(tenant, "j6", "m", 60)
    assert exc.value.details["quota"] == "usd_per_month" and exc.value.details["used"] == 0.12
    usage = book.usage(tenant)
    assert usage["usd_this_month"]["used"] == 0.12 and usage["tokens_today"]["used"] == 60
    with pytest.raises(QuotaExceededError):
        book.admit(tenant)
