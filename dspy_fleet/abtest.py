"""The A/B report of a program's variants: per-variant figures and significance tests.

Pure functions over samples (dspy_fleet/store/feedback.py reads them); no Redis, no dspy.
The statistics are scipy's and statsmodels', imported on first use (about 2 s of
imports: the API process never pays it unless someone asks for a report):

- success rate: two-proportion z-test (statsmodels ``proportions_ztest``);
- feedback score: Welch's t-test (scipy ``ttest_ind(equal_var=False)``), with the
  Mann–Whitney U test (scipy ``mannwhitneyu``) shown beside it;
- "about N more jobs needed": statsmodels' power analysis (``TTestIndPower`` for scores on
  Cohen's d, ``NormalIndPower`` on Cohen's h from ``proportion_effectsize`` for rates) at
  the observed effect size, ALPHA and POWER, keeping the observed ratio of the arms' sizes.

Every variant is compared with the control; with k variants beside the control, each test
runs at ALPHA / k (Bonferroni), so the report's chance of any false "better" stays ≤ ALPHA.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from dspy_fleet.store.feedback import Outcome, Score

ALPHA = 0.05
POWER = 0.8
# A test needs at least this many samples in each arm (below it: "not enough data").
MIN_SAMPLES = 2


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.quantile(np.asarray(values), q)), 2)


def variant_figures(
    outcomes: Iterable[Outcome], scores: Iterable[Score], known: Iterable[str] = ()
) -> dict[str, Any]:
    """Per variant: n, succeeded, success_rate, latency_ms p50/p95 (over all sampled jobs
    with a latency), cost_per_request_usd (mean over priced jobs; null when none was
    priced), feedback n and mean score."""
    jobs: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        jobs[o.variant].append(o)
    fb: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        fb[s.variant].append(s.score)
    out: dict[str, Any] = {}
    for variant in sorted(set(jobs) | set(fb) | set(known)):
        arm = jobs.get(variant, [])
        ok = sum(1 for o in arm if o.status == "succeeded")
        lat = [o.latency_ms for o in arm if o.latency_ms is not None]
        usd = [o.cost_usd for o in arm if o.cost_usd is not None]
        vals = fb.get(variant, [])
        out[variant] = {
            "n": len(arm),
            "succeeded": ok,
            "success_rate": round(ok / len(arm), 4) if arm else None,
            "latency_ms": {"p50": _quantile(lat, 0.5), "p95": _quantile(lat, 0.95)},
            "cost_per_request_usd": round(sum(usd) / len(usd), 9) if usd else None,
            "feedback": {
                "n": len(vals),
                "mean_score": round(sum(vals) / len(vals), 4) if vals else None,
            },
        }
    return out


def _more_needed(effect: float, n1: int, n2: int, alpha: float, kind: str) -> int | None:
    """Jobs (both arms together) still needed to detect ``effect`` with POWER at ``alpha``,
    keeping the arms' ratio; None when the effect is 0 (no size would do)."""
    if not effect or not math.isfinite(effect) or n1 == 0:
        return None
    from statsmodels.stats.power import NormalIndPower, TTestIndPower

    engine = TTestIndPower() if kind == "t" else NormalIndPower()
    ratio = n2 / n1 if n2 else 1.0
    try:
        nobs1 = float(engine.solve_power(effect_size=abs(effect), alpha=alpha, power=POWER,
                                         ratio=ratio, alternative="two-sided"))  # fmt: skip
    except (ValueError, RuntimeError, ArithmeticError):
        return None
    if not math.isfinite(nobs1):
        return None
    return max(0, math.ceil(nobs1 * (1 + ratio)) - (n1 + n2))


def compare_scores(a: list[float], b: list[float], alpha: float) -> dict[str, Any]:
    """Welch's t-test (and Mann–Whitney U) of b's scores against a's."""
    from scipy import stats

    out: dict[str, Any] = {"metric": "feedback_score", "n": [len(a), len(b)], "alpha": alpha}
    if min(len(a), len(b)) < MIN_SAMPLES:
        return {**out, "p_value": None, "enough_data": False}
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    t = stats.ttest_ind(b, a, equal_var=False)
    p = float(t.pvalue)
    if not math.isfinite(p):  # both arms constant: equal means say nothing differs
        p = 1.0 if mean_a == mean_b else 0.0
    try:
        mw = float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue)
    except ValueError:
        mw = None
    var_a = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    pooled = math.sqrt((var_a + var_b) / 2)
    d = (mean_b - mean_a) / pooled if pooled else 0.0
    return {
        **out,
        "enough_data": True,
        "difference": round(mean_b - mean_a, 4),
        "test": "welch_t",
        "p_value": p,
        "mann_whitney_p_value": mw,
        "effect_size": round(d, 4),
        "more_jobs_needed": None if p < alpha else _more_needed(d, len(a), len(b), alpha, "t"),
    }


def compare_rates(ok_a: int, n_a: int, ok_b: int, n_b: int, alpha: float) -> dict[str, Any]:
    """Two-proportion z-test of b's success rate against a's."""
    out: dict[str, Any] = {"metric": "success_rate", "n": [n_a, n_b], "alpha": alpha}
    if min(n_a, n_b) < MIN_SAMPLES:
        return {**out, "p_value": None, "enough_data": False}
    from statsmodels.stats.proportion import proportion_effectsize, proportions_ztest

    rate_a, rate_b = ok_a / n_a, ok_b / n_b
    if rate_a == rate_b:  # the z statistic is 0/0 when both are 0% or 100%
        p = 1.0
    else:
        _, p = proportions_ztest([ok_b, ok_a], [n_b, n_a])
        p = float(p)
    h = float(proportion_effectsize(rate_b, rate_a))
    return {
        **out,
        "enough_data": True,
        "difference": round(rate_b - rate_a, 4),
        "test": "two_proportion_z",
        "p_value": p,
        "effect_size": round(h, 4),
        "more_jobs_needed": None if p < alpha else _more_needed(h, n_a, n_b, alpha, "z"),
    }


def verdict(control: str, variant: str, result: dict[str, Any]) -> str:
    """The plain line: who is better on what, with p and n; or how far from knowing."""
    metric = result["metric"].replace("_", " ")
    n_a, n_b = result["n"]
    if not result["enough_data"]:
        return (f"{variant} vs {control}: not enough data yet on {metric} "
                f"(n = {n_b}/{n_a}; at least {MIN_SAMPLES} each)")  # fmt: skip
    p = result["p_value"]
    if p < result["alpha"]:
        better, worse = (variant, control) if result["difference"] > 0 else (control, variant)
        return f"{better} better than {worse} on {metric}, p = {p:.3g}, n = {n_b}/{n_a}"
    more = result["more_jobs_needed"]
    tail = (f"about {more} more jobs needed at this effect size" if more is not None
            else "no difference measured at all")  # fmt: skip
    return (f"{variant} vs {control}: no significant difference yet on {metric} "
            f"(p = {p:.3g}); {tail}")  # fmt: skip


def report(
    outcomes: list[Outcome],
    scores: list[Score],
    control: str | None = None,
    known: Iterable[str] = (),
) -> dict[str, Any]:
    """The report body: ``variants`` (variant_figures), ``control``, and per other variant a
    ``comparisons`` entry (on the feedback score when both arms have feedback, else on
    the success rate; both tests are given) with its ``verdict`` line; ``verdict`` joins
    them. ``known``: the configured variants, shown (n = 0) even without samples.
    ``control`` defaults to the first variant by name."""
    figures = variant_figures(outcomes, scores, known)
    names = sorted(figures)
    if control is None or control not in figures:
        control = names[0] if names else None
    by_variant: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        by_variant[s.variant].append(s.score)
    others = [n for n in names if n != control]
    alpha = ALPHA / max(1, len(others))
    comparisons = []
    for name in others:
        assert control is not None
        a, b = figures[control], figures[name]
        rates = compare_rates(a["succeeded"], a["n"], b["succeeded"], b["n"], alpha)
        fb = compare_scores(by_variant[control], by_variant[name], alpha)
        primary = fb if fb["enough_data"] else rates
        comparisons.append({"variant": name, "against": control, "primary": primary["metric"],
                            "feedback_score": fb, "success_rate": rates,
                            "verdict": verdict(control, name, primary)})  # fmt: skip
    if not names:
        line = "no finished jobs in this window"
    elif not comparisons:
        line = f"only one variant ({control}) in this window: nothing to compare"
    else:
        line = "; ".join(c["verdict"] for c in comparisons)
    return {"control": control, "alpha": ALPHA, "power": POWER, "variants": figures,
            "comparisons": comparisons, "verdict": line}  # fmt: skip
