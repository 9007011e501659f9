"""Import dspy (and, when needed, litellm) the way a server must: offline, no cache in $HOME.

Import ``dspy`` through this module only; the environment must be set before
the first import of either library. litellm is imported on first use
(:func:`litellm_module`): it weighs ~150 MB, and a worker whose models all use
DSPy's own engine never needs it.
"""

from __future__ import annotations

import os
import tempfile

# litellm downloads its price map at import time unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# dspy creates ~/.dspy_cache at import; a service must not write to the user's home.
os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "dspy-fleet-dspy-cache"))

import copy  # noqa: E402
import functools  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import dspy  # noqa: E402

# Our own cache (keyed on program version, model and parameters) replaces DSPy's.
dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
# DSPy keeps every call in an in-memory history by default: a leak in a long-lived worker.
dspy.configure(disable_history=True)


def _memoize_model_metadata() -> None:
    """Look each model up in DSPy's model metadata once per process, not on every call.

    After every call DSPy's engine prices the answer (``dspy.clients.costs.estimate_cost``,
    advisory: the fleet bills from its own prices, dspy_fleet/cost.py) and plans
    capabilities through ``model_metadata.model_info``. For a model the bundled table does
    not name (a self-hosted or mock model) each lookup scans all ~2,600 entries' aliases
    and regex rules, twice per call: 0.85 ms of the worker's 4.5 ms of CPU per prediction
    in ``make bench-profile`` (19 % of its samples). The table is loaded once per process
    and never changes after, so the answer for ``(provider, model, namespaces)`` does not
    either; each caller still gets its own deep copy, as from the original. (dspy is pinned
    in pyproject.toml; tests/test_dspy_patches.py fails if this no longer applies.)
    """
    from dspy.clients import capabilities, costs, model_metadata

    original = model_metadata.model_info
    if getattr(original, "_dspy_fleet_memo", False):
        return

    @functools.lru_cache(maxsize=1024)
    def lookup(table: int, provider: Any, model: Any, namespaces: Any) -> dict[str, Any]:
        del table  # part of the key only: a reloaded table is another table
        names = None if namespaces is None else list(namespaces)
        return original(provider, model, namespaces=names)

    @functools.wraps(original)
    def model_info(provider: Any, model: Any, *, namespaces: Any = None) -> dict[str, Any]:
        try:
            key = None if namespaces is None else tuple(namespaces)
            found = lookup(id(model_metadata._load()), provider, model, key)
        except TypeError:  # an unhashable argument: not ours to judge
            return original(provider, model, namespaces=namespaces)
        return copy.deepcopy(found)

    model_info._dspy_fleet_memo = True  # type: ignore[attr-defined]
    model_info.cache_info = lookup.cache_info  # type: ignore[attr-defined]
    for module in (model_metadata, costs, capabilities):
        module.model_info = model_info


_memoize_model_metadata()


@functools.cache
def litellm_module() -> ModuleType:
    """litellm, imported once and told to stay quiet and offline."""
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    _skip_idle_service_hooks(litellm)
    return litellm


def _skip_idle_service_hooks(litellm: ModuleType) -> None:
    """Skip LiteLLM's service-health events when nothing listens to them.

    Every completion reports its own timing through ``ServiceLogging``, whose sync
    path runs ``asyncio.run`` (a new event loop per call) to loop over
    ``litellm.service_callback``, which is empty unless service monitoring is
    configured: 2.7 % of the worker's CPU in our py-spy profile (bench figure a). With
    a callback registered, the hooks run as before. (litellm is pinned in
    pyproject.toml; tests/test_litellm_patch.py fails if this no longer applies.)
    """
    from litellm._service_logger import ServiceLogging

    for name in ("service_success_hook", "service_failure_hook"):
        original = getattr(ServiceLogging, name)
        if getattr(original, "_dspy_fleet_guard", False):
            continue

        def hook(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if not litellm.service_callback and not self.mock_testing:
                return None
            return _original(self, *args, **kwargs)

        hook._dspy_fleet_guard = True  # type: ignore[attr-defined]
        setattr(ServiceLogging, name, functools.wraps(original)(hook))


__all__ = ["dspy", "litellm_module"]
