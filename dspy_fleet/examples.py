"""DSPy training examples from kept traces (GET /v1/programs/<name>/examples). Never
import dspy here: the API builds them.

One record per kept trace of a succeeded job, ready for
``dspy.Example(**record).with_inputs(*input_fields)``::

    {<input fields>: ..., <output fields>: ..., "dspy_score": 0.9 | null,
     "dspy_fleet": {"job_id", "variant", "program_version", "tenant", "finished_at",
                    "label": "expected" | "production", "input_fields": [...],
                    "feedback_n": 2}}

The outputs are the latest feedback's ``expected`` fields where a feedback gave them
(over the production outputs, field by field), the production outputs otherwise. The
score is the mean of the feedback scores (null: no feedback). Both metadata keys start
with ``dspy_``: DSPy's Example leaves such keys out of its ``keys()``, ``items()`` and
``labels()``, so they never reach a prompt, a demo or a metric's comparison.
"""

from __future__ import annotations

from typing import Any

SCORE_KEY = "dspy_score"
META_KEY = "dspy_fleet"


def example_record(kept: dict[str, Any]) -> dict[str, Any] | None:
    """The example of one kept trace (as dspy_fleet.store.traces.decode gives it), or None
    for a trace that cannot be one (a failed job)."""
    trace, feedback = kept["trace"], kept["feedback"]
    if trace.get("status") != "succeeded":
        return None
    outputs = dict(trace.get("outputs") or {})
    label = "production"
    given = [f for f in feedback if isinstance(f.get("expected"), dict) and f["expected"]]
    if given:
        latest = max(given, key=lambda f: str(f.get("created_at", "")))
        outputs.update(latest["expected"])
        label = "expected"
    scores = [float(f["score"]) for f in feedback if isinstance(f.get("score"), int | float)]
    record: dict[str, Any] = {**(trace.get("inputs") or {}), **outputs}
    record[SCORE_KEY] = sum(scores) / len(scores) if scores else None
    record[META_KEY] = {
        "job_id": trace.get("job_id"),
        "variant": trace.get("variant") or "none",
        "program_version": trace.get("program_version"),
        "tenant": trace.get("tenant"),
        "finished_at": trace.get("finished_at"),
        "label": label,
        "input_fields": trace.get("input_fields") or sorted(trace.get("inputs") or {}),
        "feedback_n": len(feedback),
    }
    return record
