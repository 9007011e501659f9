"""The program registry: DSPy programs built from the config file at worker start."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_fleet.contract import DEFAULT_TENANT, PredictFields, reserved_inputs
from dspy_fleet.errors import ConfigError, UnknownProgramError
from dspy_fleet.fleet_config import FleetConfig, ProgramConfig, reserved_message
from dspy_fleet.plan import Plan, ProgramInfo, plan_request
from worker.dspy_env import dspy


@dataclass(frozen=True)
class LoadedProgram:
    """A ready-to-call DSPy module with what callers need to know about it."""

    name: str
    module: dspy.Module
    input_fields: tuple[str, ...]
    output_fields: tuple[str, ...]
    # Changes whenever the signature, predictor, saved state or (for a ``module:`` program)
    # its package's code changes, so a cache keyed on it never serves outputs of an older
    # program.
    version: str


def import_path(path: str, key: str) -> Any:
    mod_name, _, attr = path.partition(":")
    if not attr:
        mod_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot import {path!r}: {exc}") from None


def _build_module(name: str, cfg: ProgramConfig) -> dspy.Module:
    key = f"programs.{name}"
    if cfg.module is not None:
        cls = import_path(cfg.module, f"{key}.module")
        if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
            raise ConfigError(f"{key}.module: {cfg.module!r} is not a dspy.Module class")
        return cls()
    assert cfg.signature is not None
    if "->" in cfg.signature:
        signature: Any = dspy.Signature(cfg.signature)
    else:
        signature = import_path(cfg.signature, f"{key}.signature")
        if not (isinstance(signature, type) and issubclass(signature, dspy.Signature)):
            raise ConfigError(f"{key}.signature: {cfg.signature!r} is not a dspy.Signature")
    predictor = dspy.ChainOfThought if cfg.predictor == "ChainOfThought" else dspy.Predict
    return predictor(signature)


def _call_names(module: dspy.Module) -> set[str]:
    """Every name a call of this program may pass as a keyword: the input fields of each of
    its predictors (a module may feed one's outputs to the next) and the named parameters
    of its ``forward``."""
    names: set[str] = set()
    for predictor in module.predictors():
        names.update(predictor.signature.input_fields)
    if (sig := getattr(module, "signature", None)) is not None:
        names.update(sig.input_fields)
    forward = getattr(type(module), "forward", None)
    if forward is not None:
        params = list(inspect.signature(forward).parameters.values())[1:]  # after self
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names


def _check_reserved(name: str, cfg: ProgramConfig, module: dspy.Module) -> None:
    """Refuse a program with an input DSPy would take as its own call keyword (config, lm...):
    a tenant's value for it would steer the provider call."""
    if reserved := reserved_inputs(_call_names(module)):
        where = "module" if cfg.module is not None else "signature"
        raise ConfigError(f"programs.{name}.{where}: {reserved_message(reserved)}")


def program_inputs(module: dspy.Module) -> tuple[str, ...]:
    """The input fields a call of this program takes: its first predictor's (or its own)."""
    predictors = module.predictors()
    if predictors:
        return tuple(predictors[0].signature.input_fields)
    sig = getattr(module, "signature", None)
    if sig is None:
        raise ConfigError(f"{type(module).__name__}: cannot find a signature to read fields from")
    return tuple(sig.input_fields)


def _fields(module: dspy.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Inputs of the whole program and outputs of its last predictor."""
    sig = getattr(module, "signature", None)
    predictors = module.predictors()
    if sig is None and predictors:
        sig = predictors[-1].signature
    if sig is None:
        raise ConfigError(f"{type(module).__name__}: cannot find a signature to read fields from")
    inputs = program_inputs(module)
    outputs = tuple(f for f in sig.output_fields if f != "reasoning")
    return inputs, outputs


# Packages whose code is not the program's own: a change there is an upgrade of the
# service (a new image), not of a program.
_NOT_PROGRAM_CODE = frozenset({"dspy", "litellm", "dspy_fleet", "worker"}) | frozenset(
    sys.stdlib_module_names
)


def code_files(module: dspy.Module) -> list[tuple[str, Path]]:
    """The source files a ``module:`` program's behaviour comes from, as sorted
    ``(name, path)`` pairs, the name relative to the package (``pkg/sub/mod.py``): every
    ``.py`` file of the top-level package (or the single module) that defines the
    program's class, its base classes and the classes of its sub-modules, leaving out DSPy,
    LiteLLM, this service and the standard library. Whole packages, not only the files
    loaded so far: ``forward()`` may call a helper module imported later."""
    classes = [c for c in type(module).__mro__ if c is not object]
    classes += [type(sub) for _, sub in module.named_sub_modules()]
    tops = {c.__module__.split(".")[0] for c in classes} - _NOT_PROGRAM_CODE
    files: dict[str, Path] = {}
    for top in tops:
        origin = getattr(sys.modules.get(top), "__file__", None)
        if origin is None:
            continue  # a namespace package, or defined in __main__ without a file
        path = Path(origin).resolve()
        if path.name != "__init__.py":
            files[path.name] = path
            continue
        for file in path.parent.rglob("*.py"):
            if "__pycache__" not in file.parts:
                files[f"{top}/{file.relative_to(path.parent).as_posix()}"] = file
    return sorted(files.items())


def _version(cfg: ProgramConfig, module: dspy.Module, state: Path | None) -> str:
    """16 hex digits of SHA-256 over the program's config (not its variants, description or
    traces), its predictors' signatures and instructions, its saved state and its code files
    (:func:`code_files`, each by its name and content)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            cfg.model_dump(mode="json", exclude={"variants", "description", "traces"}),
            sort_keys=True,
        ).encode()
    )
    for predictor in module.predictors():
        h.update(predictor.signature.signature.encode())
        h.update(str(predictor.signature.instructions).encode())
    if state is not None:
        h.update(state.read_bytes())
    if cfg.module is not None:
        for name, path in code_files(module):
            # By name and content, not by absolute path: two pods (or checkouts) with the
            # same code get the same version.
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def load_program(name: str, cfg: ProgramConfig, state: Path | None = None) -> LoadedProgram:
    """Build one program, loading its saved optimized state when configured."""
    module = _build_module(name, cfg)
    state = state or cfg.state
    if state is not None:
        if not state.is_file():
            raise ConfigError(f"programs.{name}.state: no such file {state}")
        try:
            module.load(str(state))
        except Exception as exc:  # dspy raises assorted errors on a bad file
            raise ConfigError(f"programs.{name}.state: cannot load {state}: {exc}") from None
    # After the state: a saved state may bring its own signature.
    _check_reserved(name, cfg, module)
    inputs, outputs = _fields(module)
    return LoadedProgram(name, module, inputs, outputs, _version(cfg, module, state))


class ProgramRegistry:
    """All configured programs (and variant states), built once per worker process."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self._programs: dict[tuple[str, str | None], LoadedProgram] = {}
        for name, cfg in config.programs.items():
            self._programs[(name, None)] = load_program(name, cfg)
            for variant, var in cfg.variants.items():
                if var.state is not None:
                    self._programs[(name, variant)] = load_program(name, cfg, var.state)
        # What the planner knows of each program: the very catalog published to the API,
        # so that the API and the worker plan from the same fields and versions.
        self._infos = {n: ProgramInfo.from_catalog(e) for n, e in self.catalog().items()}

    def plan(
        self, request: PredictFields, tenant: str = DEFAULT_TENANT
    ) -> tuple[Plan, LoadedProgram]:
        """The job's plan (dspy_fleet.plan: the API's rules too) and the program state it
        runs; a JobError when it names something unknown or its inputs do not fit.
        ``tenant`` owns the job (it scopes the cache key, as on the API)."""
        plan = plan_request(self.config, request, self._infos.get, tenant=tenant)
        return plan, self.get(plan.program, plan.variant)

    def get(self, name: str, variant: str | None = None) -> LoadedProgram:
        """A program (in the variant's saved state, if it has one); names the ones that exist."""
        found = self._programs.get((name, variant)) or self._programs.get((name, None))
        if found is None:
            raise UnknownProgramError(
                f"unknown program {name!r}", details={"programs": sorted(self.config.programs)}
            )
        return found

    def catalog(self) -> dict[str, dict[str, Any]]:
        """What the API needs to know about each program (published to Redis at start-up)."""
        out: dict[str, dict[str, Any]] = {}
        for name, cfg in self.config.programs.items():
            base = self._programs[(name, None)]
            out[name] = {
                "description": cfg.description,
                "input_fields": list(base.input_fields),
                "output_fields": list(base.output_fields),
                "version": base.version,
                "variants": {
                    v: {"weight": var.weight, "model": var.model,
                        "version": self.get(name, v).version}
                    for v, var in cfg.variants.items()
                },
            }  # fmt: skip
        return out
