"""Language models by alias: one dspy.LM per alias per process, and their prices."""

from __future__ import annotations

import functools
import logging
import os
import threading

from dspy_fleet.cost import Price
from dspy_fleet.errors import ConfigError, UnknownModelError
from dspy_fleet.fleet_config import FleetConfig, ModelConfig
from worker.dspy_env import dspy, litellm_module

log = logging.getLogger("dspy_fleet.worker")


class ModelPool:
    """dspy.LM instances built lazily from the config, shared by the threads of a process."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self._lms: dict[str, dspy.LM] = {}
        # Which engine calls each built model's provider: "dspy" (DSPy's own) or "litellm"
        # (engine: litellm, or auto falling back); the worker logs it when ready.
        self.engines: dict[str, str] = {}
        self._lock = threading.Lock()

    def model_config(self, alias: str) -> ModelConfig:
        """The config of a model alias; UnknownModelError names the ones that exist."""
        try:
            return self.config.models[alias]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {alias!r}", details={"models": sorted(self.config.models)}
            ) from None

    def warm(self) -> None:
        """Build every LM now (at worker start), so the first job does not pay for imports
        (litellm takes seconds) or the price table; a model whose key is missing is left for
        its first job."""
        for alias, cfg in self.config.models.items():
            try:
                self.get(alias)
            except ConfigError as exc:
                log.warning("model %s not built at start: %s", alias, exc.message)
            if cfg.input_price_per_1k is None or cfg.output_price_per_1k is None:
                bundled_price(cfg.litellm_model)

    def get(self, alias: str) -> dspy.LM:
        """The LM for an alias, built on first use."""
        lm = self._lms.get(alias)
        if lm is None:
            with self._lock:
                lm = self._lms.get(alias) or self._build(alias)
                self._lms[alias] = lm
        return lm

    def _build(self, alias: str) -> dspy.LM:
        cfg = self.model_config(alias)
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ConfigError(f"models.{alias}.api_key_env: ${cfg.api_key_env} is not set")
        lm = dspy.LM(
            cfg.litellm_model,
            engine=cfg.engine,
            api_base=cfg.api_base,
            # OpenAI-compatible servers without auth still want a non-empty key.
            api_key=api_key or "unused",
            timeout=cfg.timeout,
            # Our cache and our retries replace DSPy's and LiteLLM's: a retry must
            # free the worker slot and be visible in the job's attempt count.
            cache=False,
            num_retries=0,
            **cfg.lm_kwargs,
        )
        native = _native(lm)
        if not native:
            litellm_module()  # configured (quiet, offline price map) before DSPy loads it
        self.engines[alias] = "dspy" if native else "litellm"
        return lm


def _native(lm: dspy.LM) -> bool:
    """Whether DSPy calls this LM's provider with its own engine rather than LiteLLM.

    ``engine: auto`` falls back to LiteLLM for a provider DSPy's engine does not know, or
    client settings it does not take (``extra_headers``, ``api_version``, ...): DSPy's own
    offline choice (dspy/clients/backend_selection.py), made again here to know whether
    litellm will be loaded. Unknown means LiteLLM (configuring it costs only its import)."""
    if getattr(lm, "_engine_spec", None) == "litellm":
        return False
    try:
        from dspy.clients.backend_selection import select_backend

        return bool(select_backend(lm).native)
    except Exception:  # noqa: BLE001 - a DSPy-internal check; LiteLLM is the safe answer
        return False


@functools.cache
def bundled_price(provider_model: str) -> Price | None:
    """A model's USD price per token from the price table DSPy bundles, else None.

    The fallback price table of SPEC §3, for models whose config gives no price: LiteLLM's
    price map as DSPy 3.4 ships it (``dspy.clients.model_metadata``, a snapshot of
    LiteLLM 1.105's ``model_prices_and_context_window.json``), read without importing
    litellm (~150 MB) and offline (``LITELLM_LOCAL_MODEL_COST_MAP``, set by
    worker.dspy_env). ``provider_model`` is ``provider/model`` as the config gives it; a
    name without a provider has no entry. Loaded on first use (~0.1 s, ~8 MB), cached per
    model (a miss scans the table's aliases).
    """
    from dspy.clients.model_metadata import model_info, rate

    provider, _, name = provider_model.partition("/")
    if not name:
        return None
    entry = model_info(provider, name)
    per_input = rate(entry, "input_cost_per_token")
    per_output = rate(entry, "output_cost_per_token")
    if per_input is None:
        return None
    return Price(per_input, per_output or 0.0)
