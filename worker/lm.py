"""Language models by alias: one dspy.LM per alias per process, and provider error mapping."""

from __future__ import annotations

import logging
import os
import sys
import threading

from worker.dspy_env import dspy, litellm_module
from worker.errors import (
    ConfigError,
    JobError,
    ProviderError,
    ProviderRequestError,
    ProviderTimeoutError,
    UnknownModelError,
)
from worker.fleet_config import FleetConfig, ModelConfig

log = logging.getLogger("dspy_fleet.worker")


class ModelPool:
    """dspy.LM instances built lazily from the config, shared by the threads of a process."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self._lms: dict[str, dspy.LM] = {}
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
        (litellm takes seconds); a model whose key is missing is left for its first job."""
        for alias in self.config.models:
            try:
                self.get(alias)
            except ConfigError as exc:
                log.warning("model %s not built at start: %s", alias, exc.message)

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
        if cfg.engine == "litellm":
            litellm_module()  # configured (quiet, offline price map) before dspy loads it
        return dspy.LM(
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


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _from_dspy(exc: Exception) -> JobError | None:
    """DSPy ≥ 3.4 wraps provider failures in its own LMError types, with status and Retry-After."""
    from dspy.utils import exceptions as dx

    if not isinstance(exc, dx.LMError):
        return None
    status = getattr(exc, "status", None)
    retry_after = getattr(exc, "retry_after", None)
    details = {"status_code": status} if status else {}
    if isinstance(exc, dx.LMTimeoutError):
        return ProviderTimeoutError(f"provider timed out: {_short(exc)}", status_code=status,
                                    details=details)  # fmt: skip
    if isinstance(exc, dx.LMRateLimitError | dx.LMServerError | dx.LMTransportError):
        return ProviderError(
            f"provider failed: {_short(exc)}", status_code=status,
            retry_after=float(retry_after) if retry_after is not None else None, details=details,
        )  # fmt: skip
    if isinstance(exc, dx.LMProviderError):
        return ProviderRequestError(f"provider rejected the request: {_short(exc)}",
                                    details=details)  # fmt: skip
    return None


def map_provider_error(exc: Exception) -> JobError | None:
    """Our error for an exception raised by an LM call, or None if it is not one."""
    mapped = _from_dspy(exc)
    if mapped is not None:
        return mapped
    if "litellm" not in sys.modules:
        return None  # nothing below can match: litellm was never loaded
    litellm = litellm_module()
    if isinstance(exc, litellm.exceptions.Timeout):
        return ProviderTimeoutError(f"provider timed out: {_short(exc)}", status_code=408)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, litellm.exceptions.APIConnectionError):
        return ProviderError(f"cannot reach provider: {_short(exc)}")
    if not isinstance(exc, litellm.exceptions.OpenAIError | litellm.exceptions.APIError):
        return None
    if isinstance(status, int) and (status == 429 or status >= 500):
        return ProviderError(
            f"provider answered {status}: {_short(exc)}",
            status_code=status,
            retry_after=_retry_after(exc),
            details={"status_code": status},
        )
    return ProviderRequestError(
        f"provider rejected the request: {_short(exc)}", details={"status_code": status}
    )


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(getattr(exc, "message", None) or exc)
    return text if len(text) <= limit else text[:limit] + "…"
