"""Prices and cost records: what a job's tokens cost, from config or LiteLLM's price map."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dspy_fleet.fleet_config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    """USD per single input and output token."""

    input_per_token: float
    output_per_token: float


@dataclass
class CostRecord:
    """The cost record every job result carries (SPEC §3)."""

    model: str
    provider_model: str
    # None: the provider did not report the count (``usage_missing``); never a guessed 0.
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None
    cached: bool
    latency_ms: float
    attempts: int
    variant: str | None = None
    # What a cache hit saved: the tokens and cost of the call it replaced (None: unknown).
    saved_input_tokens: int | None = 0
    saved_output_tokens: int | None = 0
    saved_cost_usd: float | None = 0.0
    # The provider's answer lacked a token count: tokens and cost_usd are null for it.
    usage_missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def cache_hit(
        cls,
        model: str,
        config: ModelConfig,
        entry: Mapping[str, Any],
        *,
        price: Price | None,
        latency_ms: float,
        attempts: int,
        variant: str | None,
        input_tokens: int | None = 0,
        output_tokens: int | None = 0,
    ) -> CostRecord:
        """The record of an answer served from the cache ``entry``: it costs 0 and says what
        the call it replaced cost (the entry's tokens at ``price``; None if unknown, which
        includes an entry whose provider did not report its usage).

        ``input_tokens``/``output_tokens`` are tokens this job spent anyway (a model that
        failed before a fallback's cached answer served it): counted, never billed here.
        """
        saved_in = entry_tokens(entry, "input_tokens")
        saved_out = entry_tokens(entry, "output_tokens")
        return cls(
            model=model,
            provider_model=config.litellm_model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=0.0,
            cached=True,
            latency_ms=latency_ms,
            attempts=attempts,
            variant=variant,
            saved_input_tokens=saved_in,
            saved_output_tokens=saved_out,
            saved_cost_usd=cost_usd(price, saved_in, saved_out),
            usage_missing=input_tokens is None or output_tokens is None,
        )


def entry_tokens(entry: Mapping[str, Any], name: str) -> int | None:
    """A token count a cache entry recorded; None when its call did not report it.

    Workers always write both counts; only an explicit null means "not reported"."""
    value = entry.get(name, 0)
    return None if value is None else int(value)


def price_for(
    model: ModelConfig, table: Callable[[str], Price | None] | None = None
) -> Price | None:
    """The configured price, else ``table(provider_model)``, else None (unknown).

    The worker hands in the price table DSPy bundles (``worker.lm.bundled_price``, LiteLLM's
    price map without litellm); the API hands in none: it never imports dspy or litellm.
    """
    if model.input_price_per_1k is not None and model.output_price_per_1k is not None:
        return Price(model.input_price_per_1k / 1000, model.output_price_per_1k / 1000)
    return None if table is None else table(model.litellm_model)


def cost_usd(
    price: Price | None, input_tokens: int | None, output_tokens: int | None
) -> float | None:
    """Cost of these tokens; None (never a silent 0) when the price or a count is unknown."""
    if price is None or input_tokens is None or output_tokens is None:
        return None
    return round(input_tokens * price.input_per_token + output_tokens * price.output_per_token, 10)
