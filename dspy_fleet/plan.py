"""The request plan: what one prediction runs on, decided by one set of rules.

The API plans a request to validate it, to answer it from the cache and to write
the decision into the job message; the worker plans the message it received to
run it. Both call :func:`plan_request`, each with what it knows about the program
(:class:`ProgramInfo`: the API from the catalog the workers publish, the worker
from its registry), so a mistake gets the same error code and message whichever
process finds it. Never import dspy or flask here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from dspy_fleet.contract import DEFAULT_TENANT, PredictFields
from dspy_fleet.errors import (
    MessageValidationError,
    UnknownModelError,
    UnknownProgramError,
    UnknownVariantError,
)
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.routing import assignment_point, cache_key, choose_variant, pick_model

Fields = TypeVar("Fields", bound=PredictFields)


@dataclass(frozen=True)
class ProgramInfo:
    """What planning needs to know about a loaded program: input fields and state versions."""

    input_fields: tuple[str, ...]
    version: str | None
    variant_versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_catalog(cls, entry: Mapping[str, Any]) -> ProgramInfo:
        """From a program's catalog entry, as workers publish it (``ProgramRegistry.catalog``)."""
        arms = entry.get("variants") or {}
        return cls(
            input_fields=tuple(entry["input_fields"]),
            version=entry.get("version"),
            variant_versions={v: arm["version"] for v, arm in arms.items() if arm.get("version")},
        )

    def version_for(self, variant: str | None) -> str | None:
        """The state version a variant runs: its own saved state's, else the program's."""
        return self.variant_versions.get(variant, self.version) if variant else self.version


ProgramLookup = Callable[[str], ProgramInfo | None]


class Catalog(Protocol):
    """Anything that reads a program's published catalog entry (``store.catalog.CatalogReader``)."""

    def get(self, program: str) -> Mapping[str, Any] | None: ...


def catalog_lookup(catalog: Catalog) -> ProgramLookup:
    """A program lookup over the catalog the workers publish: how the API knows the fields."""

    def lookup(program: str) -> ProgramInfo | None:
        entry = catalog.get(program)
        return ProgramInfo.from_catalog(entry) if entry is not None else None

    return lookup


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before any model is called."""

    program: str
    variant: str | None
    model: str
    # Canonical {field: value}. None only where the program's fields are not known yet
    # (no worker has published the program to the API): the worker binds them later.
    inputs: dict[str, Any] | None
    params: dict[str, Any]  # the effective LM parameters (only those that were set)
    version: str | None  # the program state version; None where not known yet
    cache_key: str | None  # None when the request bypasses the cache or cannot be keyed yet
    cache_owner: str | None = None  # the tenant whose entries these are; None: shared by all

    def key_for(self, model: str) -> str:
        """The cache key of this request answered by ``model`` (a fallback has its own)."""
        if model == self.model and self.cache_key is not None:
            return self.cache_key
        if self.inputs is None or self.version is None:
            raise ValueError("a plan without bound inputs and a version has no cache key")
        return cache_key(
            self.program, self.version, model, self.inputs, self.params, self.cache_owner
        )

    def routed(self, fields: Fields) -> Fields:
        """``fields`` with this plan's program, model and variant written in, so that the job
        message (and the record built from it) carries the decision to the worker."""
        update = {"program": self.program, "model": self.model, "variant": self.variant}
        return fields.model_copy(update=update)


def bind_inputs(
    program: str, input_fields: tuple[str, ...], text: str | None, inputs: dict[str, Any] | None
) -> dict[str, Any]:
    """The request's canonical inputs ({field: value}), or MessageValidationError saying why not."""
    expected = ", ".join(input_fields)
    if text is not None:
        if len(input_fields) == 1:
            return {input_fields[0]: text}
        raise MessageValidationError(
            f"program {program!r} takes inputs {expected}; send them by name in 'inputs'",
            details={
                "input_fields": list(input_fields),
                "errors": [{"field": "input", "message": f"expected fields: {expected}"}],
            },
        )
    given = dict(inputs or {})
    missing = [f for f in input_fields if f not in given]
    unexpected = [f for f in given if f not in input_fields]
    if missing or unexpected:
        raise MessageValidationError(
            f"inputs do not match program {program!r}, which takes {expected}",
            details={
                "input_fields": list(input_fields),
                "missing": missing,
                "unexpected": unexpected,
                "errors": [{"field": "inputs", "message": f"expected fields: {expected}"}],
            },
        )
    return given


def plan_request(
    config: FleetConfig,
    request: PredictFields,
    programs: ProgramLookup,
    *,
    tenant: str = DEFAULT_TENANT,
) -> Plan:
    """Plan ``request`` (an HTTP body, a batch item or a job message) by the fleet's rules.

    Names are checked before inputs, in the order program, variant, model: a wrong
    name is then reported the same way even where the program's input fields are not
    known yet. ``programs(name)`` tells the program's fields and versions (None: not
    known yet; inputs are then taken as given and checked by the worker).
    Variants are assigned deterministically from the request (program, inputs, LM
    parameters) unless forced; the model is the request's, else the variant's, else
    the program's, else the default. ``tenant`` (whose request it is) scopes the cache
    key when the program's ``cache_scope`` is ``tenant``.
    """
    name = request.program or config.default_program
    prog = config.programs.get(name)
    if prog is None:
        raise UnknownProgramError(
            f"unknown program {name!r}", details={"programs": sorted(config.programs)}
        )
    if request.variant is not None and request.variant not in prog.variants:
        raise UnknownVariantError(
            f"program {name!r} has no variant {request.variant!r}",
            details={"variants": sorted(prog.variants)},
        )
    if request.model is not None and request.model not in config.models:
        raise UnknownModelError(
            f"unknown model {request.model!r}", details={"models": sorted(config.models)}
        )
    info = programs(name)
    if info is not None:
        inputs: dict[str, Any] | None = bind_inputs(
            name, info.input_fields, request.input, request.inputs
        )
    else:
        inputs = dict(request.inputs) if request.inputs is not None else None
    params = request.parameters.effective()
    variant = request.variant
    if variant is None and prog.variants and inputs is not None:
        variant = choose_variant(prog, assignment_point(name, inputs, params))
    model = pick_model(config, name, request.model, variant)
    version = info.version_for(variant) if info is not None else None
    owner = tenant if prog.cache_scope == "tenant" else None
    key = None
    if request.use_cache and inputs is not None and version:
        key = cache_key(name, version, model, inputs, params, owner)
    return Plan(name, variant, model, inputs, params, version, key, owner)
