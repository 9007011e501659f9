"""Figures, run sizes and the one-line-per-figure output."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sizes:
    """How much each figure measures; quick mode is small, full mode longer and steadier."""

    rounds: int  # baseline and ours measured alternately this many times; medians reported
    worker_jobs: int  # (a)
    io_jobs: int  # (b)
    http_seconds: float  # (c), (d): each wrk run
    latency_requests: int  # (e), at 50 req/s
    fast_fail_requests: int  # (h)
    interactive_requests: int  # (m): idle, and again during the batch


MODES = {
    "smoke": Sizes(rounds=1, worker_jobs=100, io_jobs=128, http_seconds=1,
                   latency_requests=50, fast_fail_requests=20, interactive_requests=10),
    "quick": Sizes(rounds=1, worker_jobs=400, io_jobs=640, http_seconds=4,
                   latency_requests=300, fast_fail_requests=100, interactive_requests=30),
    "full": Sizes(rounds=3, worker_jobs=1500, io_jobs=2560, http_seconds=10,
                  latency_requests=1000, fast_fail_requests=300, interactive_requests=60),
}  # fmt: skip


@dataclass
class Figure:
    """One measured figure against its baseline and its target."""

    name: str
    value: float
    unit: str
    baseline: float
    baseline_unit: str
    target: str  # "measured" where the figure only describes the run
    met: bool | None  # None: no target to meet
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Ours over the baseline."""
        return self.value / self.baseline if self.baseline else float("nan")

    def line(self) -> str:
        """``name: value (baseline: value, ratio: r, target: t)``."""
        return (
            f"{self.name}: {_num(self.value)} {self.unit} "
            f"(baseline: {_num(self.baseline)} {self.baseline_unit}, ratio: {self.ratio:.2f}, "
            f"target: {self.target})"
        )


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def median(values: list[float]) -> float:
    """The median of the rounds."""
    return statistics.median(values)


def spread(label: str, values: list[float]) -> str:
    """A note listing each round's value, to show the noise."""
    return f"{label} per round: " + ", ".join(_num(v) for v in values)


def parse_mode(prog: str, doc: str | None, argv: list[str] | None) -> str:
    """``full`` by default, ``quick`` or ``smoke`` from the command line."""
    return parse_options(prog, doc, argv)[0]


def parse_options(
    prog: str, doc: str | None, argv: list[str] | None, alone: list[str] | None = None
) -> tuple[str, str | None]:
    """The mode (as :func:`parse_mode`) and, when ``alone`` names figures that can run by
    themselves, the one ``--only`` asked for (None: every figure)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="short runs")
    group.add_argument("--smoke", action="store_true", help="shortest runs (the test suite's)")
    if alone:
        parser.add_argument(
            "--only", choices=alone, default=None, help="measure only this figure (all start)"
        )
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return mode, getattr(args, "only", None)


def print_report(figures: list[Figure], header: str) -> None:
    """One line per figure on stdout, then ``#`` lines: the header, every note, the targets."""
    for fig in figures:
        print(fig.line())
    print(f"# {header}")
    for fig in figures:
        for note in fig.notes:
            print(f"# {fig.name}: {note}")
    targeted = [f for f in figures if f.met is not None]
    missed = [f.name for f in targeted if not f.met]
    print(f"# targets met: {len(targeted) - len(missed)}/{len(targeted)}"
          + (f"; missed: {', '.join(missed)}" if missed else ""))  # fmt: skip
