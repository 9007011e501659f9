"""A bare Celery app: one task that calls the same DSPy program through the same LM.

It gets the very Celery settings our worker uses (serializer, acks_late, prefetch,
events, pool, concurrency), but none of our per-job work: no message contract, job
store, cache, breaker, ledger, metrics or JSON logs. ``celery -A`` targets this module.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

# The same offline, cache-less DSPy set-up as worker/dspy_env.py, written out here so
# that the baseline does not depend on our code for it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "bench-bare-dspy"))

import dspy  # noqa: E402
from celery import Celery  # noqa: E402

from dspy_fleet.broker.celery_config import celery_config  # noqa: E402
from dspy_fleet.settings import WorkerSettings, load_settings  # noqa: E402

dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
dspy.configure(disable_history=True)

settings = load_settings(WorkerSettings)

if os.environ.get("BENCH_BARE_KOMBU_PATCH") == "1":
    # Like-for-like runs: the bare side gets our kombu fix too (dspy_fleet/broker/kombu_patch.py).
    from dspy_fleet.broker import kombu_patch

    kombu_patch.install()
app = Celery("bare", set_as_current=False)
app.conf.update(celery_config(settings))

_lm: dspy.LM | None = None
_program = dspy.Predict("question -> answer")  # the default config's `qa` program
_lock = threading.Lock()


class BareFailure(Exception):
    """The failure the fast-fail baseline raises at once."""


def _get_lm() -> dspy.LM:
    global _lm
    with _lock:
        if _lm is None:
            # The default config's `mock` model, built as worker/lm.py builds it (same engine).
            _lm = dspy.LM(
                "openai/mock-gpt",
                engine=os.environ.get("DSPY_FLEET_BENCH_ENGINE", "auto"),
                api_base=os.environ["DSPY_FLEET_MOCK_LLM_URL"],
                api_key="unused",
                timeout=30,
                cache=False,
                num_retries=0,
            )
    return _lm


@app.task(name="bare.predict")
def predict(question: str) -> dict[str, Any]:
    """Run the program on one question and return its outputs."""
    with dspy.context(lm=_get_lm()):
        return dict(_program(question=question).toDict())


@app.task(name="bare.fail", throws=(BareFailure,))
def fail(question: str) -> None:
    """Fail at once, like a job refused by an open breaker."""
    raise BareFailure("refused")
