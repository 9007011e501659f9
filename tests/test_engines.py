"""DSPy's own engine by default, LiteLLM per model (issue 18 item 1).

DSPy 3.4's ``engine="auto"`` calls the provider with DSPy's own engine where it knows the
provider and the client settings, and through LiteLLM otherwise. A worker whose models all
run on DSPy's engine never imports litellm (~150 MB); its prices come from the table DSPy
bundles. The other tests that depend on the engine run on both: error classification
(test_provider_outcomes.py), usage and prices (test_honest_accounting.py), retries and
Retry-After (test_fault_tolerance.py), gateways (test_gateway_causes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspy_fleet.fleet_config import load_fleet_config
from dspy_fleet.settings import DEFAULT_CONFIG_FILE

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: what a worker process loads, from its start to its first
# answered job. The stub provider runs in that process too.
PROBE = """
import json, resource, sys, tempfile
from pathlib import Path
from tests.stub_provider import StubProvider, completion
stub = StubProvider(lambda route, nth, request: completion())
config = Path(tempfile.mkdtemp()) / "fleet.yaml"
config.write_text('''
default_model: m
models:
  m: {litellm_model: openai/gpt-4o-mini, api_base: "%(base)s", timeout: 10, %(extra)s}
programs:
  qa: {signature: "question -> answer"}
''' % {"base": stub.base("ok"), "extra": sys.argv[1]})
from dspy_fleet.fleet_config import load_fleet_config
from worker.dspy_env import dspy
from worker.lm import ModelPool, bundled_price
from worker.predict import Usage, call_program
pool = ModelPool(load_fleet_config(config))
pool.warm()
usage = Usage()
out = call_program(dspy.Predict("question -> answer"), pool.get("m"), {"question": "q"}, {},
                   usage)
litellm = sys.modules.get("litellm")
print(json.dumps({
    "answer": out["answer"], "tokens": [usage.input_tokens, usage.output_tokens],
    "engines": pool.engines, "price": list(vars(bundled_price("openai/gpt-4o-mini")).values()),
    "litellm_loaded": litellm is not None,
    "litellm_configured": bool(litellm and litellm.suppress_debug_info),
    "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}))
stub.stop()
"""


def _worker_probe(extra: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE, extra], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_models_run_on_dspy_s_own_engine_unless_the_config_says_litellm(tmp_path: Path) -> None:
    assert {m.engine for m in load_fleet_config(DEFAULT_CONFIG_FILE).models.values()} == {"auto"}
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "default_model: a\nmodels:\n  a: {litellm_model: openai/x}\n"
        "  b: {litellm_model: openai/x, engine: litellm}\n"
        'programs:\n  qa: {signature: "question -> answer"}\n'
    )
    models = load_fleet_config(path).models
    assert (models["a"].engine, models["b"].engine) == ("auto", "litellm")


@pytest.mark.parametrize(
    ("extra", "engine"),
    [
        ("engine: auto", "dspy"),
        # A client setting DSPy's engine does not take: DSPy falls back to LiteLLM, and
        # the worker configures litellm (quiet, offline) before DSPy loads it.
        ("lm_kwargs: {extra_headers: {X-Tenant: a}}", "litellm"),
    ],
)
def test_a_worker_on_dspy_s_engine_never_loads_litellm(extra: str, engine: str) -> None:
    result = _worker_probe(extra)
    print(f"\n{extra}: {result}")
    assert result["answer"] == "forty-two" and result["tokens"] == [10, 5]
    assert result["engines"] == {"m": engine}
    # gpt-4o-mini at $0.15/$0.60 per 1M tokens, from the table DSPy bundles.
    assert result["price"] == [pytest.approx(0.15e-6), pytest.approx(0.60e-6)]
    assert result["litellm_loaded"] is (engine == "litellm")
    assert result["litellm_configured"] is (engine == "litellm")
