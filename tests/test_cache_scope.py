"""Cache scope: no tenant learns from the cache what another tenant asked.

A real fleet (Redis, its own mock LLM, a worker, the API with two tenants' keys). Program
``qa`` has the default ``cache_scope: tenant``; ``shared`` says ``global``. Every provider
call is counted by the mock, per model name, so "each paid for its own call" is a count
of HTTP requests the provider received, not a field the fleet reports about itself.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.auth import new_key
from tests.conftest import OwnStack, running_fleet

CONFIG = """
default_model: mock
models:
  mock: {litellm_model: openai/scope-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 10,
         input_price_per_1k: 0.00015, output_price_per_1k: 0.0006}
programs:
  qa: {signature: "question -> answer"}
  shared: {signature: "question -> answer", cache_scope: global}
"""
KEYS = {"alice": new_key(), "bob": new_key()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    with running_fleet(tmp_path_factory.mktemp("cache-scope"), config=CONFIG, keys=KEYS) as stack:
        yield stack


def provider_calls(fleet: OwnStack) -> int:
    """Chat completions the mock answered for this module's model."""
    return int(fleet.mock.stats()["by_model"].get("scope-gpt", 0))


def predict(fleet: OwnStack, tenant: str, program: str, question: str) -> dict[str, Any]:
    """POST /v1/predict as ``tenant`` and wait for the answer (200, succeeded)."""
    assert fleet.api is not None
    resp = httpx.post(
        f"{fleet.api.url}/v1/predict",
        json={"program": program, "input": question, "wait": 20},
        headers={"Authorization": f"Bearer {KEYS[tenant]}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == "succeeded", body
    return body


def test_tenant_scope_each_tenant_pays_for_its_own_call(fleet: OwnStack) -> None:
    question = f"what did the other tenant ask? {uuid.uuid4().hex}"
    before = provider_calls(fleet)
    first = predict(fleet, "alice", "qa", question)
    second = predict(fleet, "bob", "qa", question)
    assert not first["cached"] and not second["cached"]
    assert provider_calls(fleet) - before == 2
    # Bob is billed for his own call, not shown Alice's saved tokens.
    assert second["cost"]["cost_usd"] > 0 and not second["cost"].get("cached")
    # Within one tenant the cache still works (the API's fast path answers the repeat).
    again = predict(fleet, "bob", "qa", question)
    assert again["cached"] and provider_calls(fleet) - before == 2


def test_tenant_scope_holds_for_concurrent_duplicates(fleet: OwnStack) -> None:
    """Both tenants send the same input at once, with the provider slow: neither is
    coalesced onto the other's in-flight call (coalescing shares the cache key)."""
    question = f"same moment {uuid.uuid4().hex}"
    fleet.mock.set_faults(latency_ms=1500)
    try:
        before = provider_calls(fleet)
        answers: dict[str, dict[str, Any]] = {}

        def send(tenant: str) -> None:
            answers[tenant] = predict(fleet, tenant, "qa", question)

        threads = [threading.Thread(target=send, args=(t,)) for t in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        fleet.mock.set_faults(latency_ms=0)
    assert set(answers) == {"alice", "bob"}
    assert not answers["alice"]["cached"] and not answers["bob"]["cached"]
    assert provider_calls(fleet) - before == 2


def test_global_scope_shares_one_answer(fleet: OwnStack) -> None:
    question = f"a question anyone may share {uuid.uuid4().hex}"
    before = provider_calls(fleet)
    first = predict(fleet, "alice", "shared", question)
    second = predict(fleet, "bob", "shared", question)
    assert not first["cached"] and second["cached"]
    assert second["outputs"] == first["outputs"]
    assert provider_calls(fleet) - before == 1
