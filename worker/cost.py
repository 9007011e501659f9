"""Prices and cost records: what a job's tokens cost, from config or LiteLLM's price map."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from worker.fleet_config import ModelConfig

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
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    cached: bool
    latency_ms: float
    attempts: int
    variant: str | None = None
    # What a cache hit saved: the tokens and cost of the call it replaced.
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    saved_cost_usd: float | None = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def price_for(model: ModelConfig, *, use_litellm_map: bool = True) -> Price | None:
    """The configured price, else LiteLLM's bundled price map, else None (unknown).

    The API passes ``use_litellm_map=False``: it must never import litellm.
    """
    if model.input_price_per_1k is not None and model.output_price_per_1k is not None:
        return Price(model.input_price_per_1k / 1000, model.output_price_per_1k / 1000)
    if not use_litellm_map:
        return None
    from worker.dspy_env import litellm_module  # the API never reaches this branch

    litellm = litellm_module()

    name = model.litellm_model
    for key in (name, name.split("/", 1)[-1]):
        entry = litellm.model_cost.get(key)
        if entry and "input_cost_per_token" in entry:
            return Price(entry["input_cost_per_token"], entry.get("output_cost_per_token", 0.0))
    return None


def cost_usd(price: Price | None, input_tokens: int, output_tokens: int) -> float | None:
    """Cost of these tokens; None (never a silent 0) when the price is unknown."""
    if price is None:
        return None
    return round(input_tokens * price.input_per_token + output_tokens * price.output_per_token, 10)
