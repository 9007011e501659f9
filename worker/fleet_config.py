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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.errors import ConfigError
from worker.settings import describe_validation_error

# ${VAR} or ${VAR:-default}: lets one file serve local runs, tests on free ports and pods.
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


class ModelConfig(BaseModel):
    """One model alias: how to reach it through LiteLLM and what it costs."""

    model_config = ConfigDict(extra="forbid")

    litellm_model: str = Field(description="LiteLLM model string, e.g. openai/gpt-4o-mini.")
    # DSPy's engine: "litellm" (the default) calls providers through LiteLLM; "auto" lets
    # DSPy 3.4 use its built-in lm15 engine where it can, which saves ~150 MB per worker.
    engine: Literal["litellm", "auto", "lm15"] = "litellm"
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


class VariantConfig(BaseModel):
    """One arm of an A/B split: a model and/or a saved program state, with a weight."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=1.0, gt=0)
    model: str | None = None
    state: Path | None = None


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
        for name, prog in self.programs.items():
            refs = [("model", prog.model)] + [
                (f"variants.{v}.model", var.model) for v, var in prog.variants.items()
            ]
            for where, ref in refs:
                if ref is not None and ref not in self.models:
                    raise ValueError(f"programs.{name}.{where}: unknown model {ref!r}")
        return self

    def model_for(self, program: str, requested: str | None) -> str:
        """The model alias a job uses: the request's, else the program's, else the default."""
        prog = self.programs.get(program)
        return requested or (prog.model if prog else None) or self.default_model


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
