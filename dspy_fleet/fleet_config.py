"""The models/programs YAML file (DSPY_FLEET_CONFIG): its schema and its loader.

Both the API (to reject unknown programs and models before enqueueing) and the
worker read it, so this module must never import dspy or litellm.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dspy_fleet.contract import reserved_inputs, signature_input_names
from dspy_fleet.errors import ConfigError
from dspy_fleet.settings import describe_validation_error

# ${VAR} or ${VAR:-default}: lets one file serve local runs, tests on free ports and pods.
_TENANT_NAME = re.compile(r"[\w.:-]{1,64}")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class BreakerOverrides(BaseModel):
    """Per-model breaker thresholds; unset ones come from the worker settings."""

    model_config = ConfigDict(extra="forbid")

    failure_threshold: int | None = Field(default=None, ge=1)
    failure_rate: float | None = Field(default=None, gt=0, le=1)
    min_calls: int | None = Field(default=None, ge=1)
    window_seconds: int | None = Field(default=None, ge=1)
    recovery_seconds: float | None = Field(default=None, gt=0)
    half_open_max_calls: int | None = Field(default=None, ge=1)
    success_threshold: int | None = Field(default=None, ge=1)
    settle_seconds: float | None = Field(default=None, ge=0)


class RateLimits(BaseModel):
    """A provider's limits on one model or account (none set: unlimited, learned from 429s).

    Take them from the provider's account page (e.g. OpenAI's limits page lists RPM and
    TPM per model and tier). Enforced fleet-wide by dspy_fleet/store/pacing.py."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute (input + output).")
    max_concurrency: int | None = Field(default=None, ge=1, description="Calls in flight.")


class TenantQuota(BaseModel):
    """One tenant's quotas and budget (none set: unlimited). Days and months are UTC, on
    Redis's clock; enforced by dspy_fleet/store/quotas.py at submission and before each
    provider call. 0 suspends the tenant."""

    model_config = ConfigDict(extra="forbid")

    requests_per_day: int | None = Field(
        default=None, ge=0, description="Requests accepted per UTC day (each batch item is one)."
    )
    tokens_per_day: int | None = Field(
        default=None, ge=0, description="Input + output tokens billed per UTC day."
    )
    usd_per_month: float | None = Field(
        default=None, ge=0, description="USD billed per UTC calendar month (the /costs records)."
    )

    @field_validator("requests_per_day", "tokens_per_day", "usd_per_month", mode="before")
    @classmethod
    def _exponent(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads `2e6` as a string; a count written that way is meant as one.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value
            return int(number) if number.is_integer() else number
        return value


class ModelConfig(BaseModel):
    """One model alias: how to reach it through LiteLLM and what it costs."""

    model_config = ConfigDict(extra="forbid")

    litellm_model: str = Field(description="provider/model as dspy.LM takes it, e.g. "
                               "openai/gpt-4o-mini.")  # fmt: skip
    # DSPy's engine: "auto" (DSPy's default and ours) calls the provider with DSPy's own
    # engine where it knows the provider and the settings, else through LiteLLM; "litellm"
    # always through LiteLLM; "lm15" DSPy's engine or an error. DSPy's engine costs about a
    # third of LiteLLM's CPU per call, and a worker that never loads litellm ~150 MB less.
    engine: Literal["litellm", "auto", "lm15"] = "auto"
    api_base: str | None = None
    # The name of the env var holding the key; the key itself never enters config.
    api_key_env: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    lm_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_price_per_1k: float | None = Field(default=None, ge=0)
    output_price_per_1k: float | None = Field(default=None, ge=0)
    fallbacks: list[str] = Field(default_factory=list)
    max_retries: int | None = Field(default=None, ge=0, le=20)
    breaker: BreakerOverrides = Field(default_factory=lambda: BreakerOverrides())
    # The provider's limits on this model (fleet-wide; none: unlimited, learned from 429s),
    # and the provider account whose limits it shares with other aliases (see `accounts`).
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    account: str | None = None


class VariantConfig(BaseModel):
    """One arm of an A/B split: a model and/or a saved program state, with a weight."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=1.0, gt=0)
    model: str | None = None
    state: Path | None = None


class TraceConfig(BaseModel):
    """What the worker records of a program's runs (dspy_fleet/store/traces.py): inputs,
    outputs, each LM call's messages and answer, variant and program version. Traces go to
    Redis (and to ``file`` when set), never to the logs."""

    model_config = ConfigDict(extra="forbid")

    sample_rate: float = Field(
        default=0.01, ge=0, le=1, description="Share of the program's jobs whose trace is kept."
    )
    keep_on_feedback: bool = Field(
        default=True,
        description=(
            "Also keep the trace of a job that was not sampled once it gets feedback: every "
            "job's trace waits feedback_window_hours in a pending slot, and a feedback post "
            "keeps it."
        ),
    )
    feedback_window_hours: float = Field(
        default=24, gt=0, le=24 * 30, description="How long a pending trace waits for feedback."
    )
    ttl_days: float = Field(default=7, gt=0, le=365, description="How long a kept trace lives.")
    max_traces: int = Field(
        default=10_000, ge=1, description="Kept traces per program (the oldest go first)."
    )
    max_trace_bytes: int = Field(
        default=65_536,
        ge=1024,
        description=(
            "Largest trace stored, in bytes of JSON: a larger one loses its LM calls' text "
            "(marked truncated); if still larger it is dropped."
        ),
    )
    sensitive_fields: list[str] = Field(
        default_factory=list,
        description=(
            "Input or output fields whose values are replaced by [redacted] before the trace "
            "is stored, in inputs, outputs and inside the LM messages and answers."
        ),
    )
    redact: str | None = Field(
        default=None,
        description='"pkg.mod:function" taking the trace dict and returning it redacted, '
        "run after sensitive_fields.",
    )
    file: Path | None = Field(
        default=None,
        description="Also append each kept trace as one JSON line to this file (per worker).",
    )

    @property
    def capturing(self) -> bool:
        """Whether any job of the program records its trace at all."""
        return self.sample_rate > 0 or self.keep_on_feedback


class ProgramConfig(BaseModel):
    """One registered program: a signature string, a Signature class or a Module class."""

    model_config = ConfigDict(extra="forbid")

    signature: str | None = Field(
        default=None, description='"context, question -> answer" or "pkg.mod:SignatureClass".'
    )
    module: str | None = Field(default=None, description='"pkg.mod:ModuleClass" (a dspy.Module).')
    predictor: str = Field(default="Predict", description="Predict or ChainOfThought.")
    state: Path | None = Field(default=None, description="JSON written by program.save(path).")
    model: str | None = Field(default=None, description="Default model alias for this program.")
    description: str = ""
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    traces: TraceConfig = Field(default_factory=lambda: TraceConfig())
    cache_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description=(
            "Who shares this program's cached answers: 'tenant' (each tenant its own, so no "
            "tenant learns what another asked) or 'global' (every tenant). Without API keys "
            "every caller is the one default tenant, so both share."
        ),
    )

    @field_validator("signature")
    @classmethod
    def _no_reserved_inputs(cls, signature: str | None) -> str | None:
        # A string signature's inputs are known without DSPy: refuse DSPy's own call
        # keywords here, so the API refuses the file too (class paths: worker.programs).
        names = signature_input_names(signature) if signature and "->" in signature else ()
        if reserved := reserved_inputs(names):
            raise ValueError(reserved_message(reserved))
        return signature

    @model_validator(mode="after")
    def _one_definition(self) -> ProgramConfig:
        if (self.signature is None) == (self.module is None):
            raise ValueError("give exactly one of 'signature' or 'module'")
        if self.predictor not in ("Predict", "ChainOfThought"):
            raise ValueError("predictor must be Predict or ChainOfThought")
        return self


class FleetConfig(BaseModel):
    """The whole file: default names plus the model and program tables."""

    model_config = ConfigDict(extra="forbid")

    default_model: str
    default_program: str = "qa"
    models: dict[str, ModelConfig]
    programs: dict[str, ProgramConfig]
    # Provider accounts whose limits several model aliases share (models.<alias>.account).
    accounts: dict[str, RateLimits] = Field(default_factory=dict)
    # Per-tenant quotas and budgets (tenants not listed: unlimited).
    tenants: dict[str, TenantQuota] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, TenantQuota]) -> dict[str, TenantQuota]:
        for name in tenants:
            if not _TENANT_NAME.fullmatch(name):
                raise ValueError(
                    f"tenant name {name!r} must be 1-64 characters of letters, digits, '_.:-' "
                    "(as in DSPY_FLEET_API_KEYS)"
                )
        return tenants

    @model_validator(mode="after")
    def _references_resolve(self) -> FleetConfig:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not under 'models'")
        if self.default_program not in self.programs:
            raise ValueError(f"default_program {self.default_program!r} is not under 'programs'")
        for alias, model in self.models.items():
            for fb in model.fallbacks:
                if fb not in self.models:
                    raise ValueError(f"models.{alias}.fallbacks: unknown model {fb!r}")
            if model.account is not None and model.account not in self.accounts:
                raise ValueError(
                    f"models.{alias}.account: unknown account {model.account!r} "
                    f"(accounts: {sorted(self.accounts)})"
                )
        for name, prog in self.programs.items():
            refs = [("model", prog.model)] + [
                (f"variants.{v}.model", var.model) for v, var in prog.variants.items()
            ]
            for where, ref in refs:
                if ref is not None and ref not in self.models:
                    raise ValueError(f"programs.{name}.{where}: unknown model {ref!r}")
        return self


def reserved_message(reserved: list[str]) -> str:
    """What a config error says of input fields DSPy reserves."""
    names = ", ".join(repr(n) for n in reserved)
    return (
        f"input field {names} is a keyword DSPy takes as call settings (config, lm, demos, "
        "...), so a tenant's input could steer the provider call; rename the field"
    )


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _resolve_paths(cfg: FleetConfig, base: Path) -> FleetConfig:
    """Relative state paths are relative to the config file, not to the working directory."""
    for prog in cfg.programs.values():
        if prog.state is not None and not prog.state.is_absolute():
            prog.state = base / prog.state
        if prog.traces.file is not None and not prog.traces.file.is_absolute():
            prog.traces.file = base / prog.traces.file
        for var in prog.variants.values():
            if var.state is not None and not var.state.is_absolute():
                var.state = base / var.state
    return cfg


def load_fleet_config(path: Path) -> FleetConfig:
    """Read, expand and validate the config file; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"DSPY_FLEET_CONFIG: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"DSPY_FLEET_CONFIG: {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"DSPY_FLEET_CONFIG: {path} must hold a mapping at the top level")
    try:
        cfg = FleetConfig.model_validate(_expand_env(raw))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    return _resolve_paths(cfg, path.parent)
