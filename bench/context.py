"""What every figure gets: the running stack, the run sizes, the producers and a logger."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from bench.producers import Producers
from bench.report import Sizes
from bench.stack import Stack


@dataclass
class Bench:
    """One bench run in progress."""

    stack: Stack
    sizes: Sizes
    producers: Producers

    def say(self, text: str) -> None:
        """Progress, on stderr (stdout carries only the figures)."""
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def sides(self, round_no: int) -> tuple[str, str]:
        """Alternate which side goes first, so drift on the machine hits both alike."""
        return ("bare", "ours") if round_no % 2 == 0 else ("ours", "bare")
