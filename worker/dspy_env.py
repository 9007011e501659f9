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
import logging  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import dspy  # noqa: E402
from dspy.utils.callback import BaseCallback  # noqa: E402

log = logging.getLogger("dspy_fleet.worker")

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


# The dspy.context key under which a job hands its own LM callbacks (its breaker outcomes, its
# trace) to :data:`LM_CALLBACKS`. A DSPy setting, so DSPy's Parallel carries it into its
# threads as it carries the LM.
JOB_LM_CALLBACKS = "dspy_fleet_lm_callbacks"


class LMCallbacks(BaseCallback):
    """The one callback every LM in a worker process carries (_job_callbacks_on_every_lm): it
    passes each LM call's start and end to the callbacks of the job running it
    (``dspy.context(dspy_fleet_lm_callbacks=...)``), and to nothing outside a job.

    Why not ``dspy.context(callbacks=...)``: DSPy runs the callbacks of its settings around
    every module, adapter and LM call (dspy/utils/callback.py, ``with_callbacks``), each
    wrapped call paying a call id, ``inspect.getcallargs`` and a no-op handler per callback.
    Ours only listen to LM calls; on the module and the adapter that cost was ~0.3 ms of a
    job's 4.7 ms of worker CPU (``make bench-profile``, 2026-12-01). A handler that raises
    is logged and the others still run, as DSPy does with its own."""

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """Pass the start of an LM call on to the job's callbacks."""
        for callback in dspy.settings.get(JOB_LM_CALLBACKS) or ():
            try:
                callback.on_lm_start(call_id=call_id, instance=instance, inputs=inputs)
            except Exception as exc:  # noqa: BLE001 - as DSPy treats a callback's error
                log.warning("LM callback %r failed on the call's start: %s", callback, exc)

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        """Pass the end of an LM call (its outputs or the exception it raised) on."""
        for callback in dspy.settings.get(JOB_LM_CALLBACKS) or ():
            try:
                callback.on_lm_end(call_id=call_id, outputs=outputs, exception=exception)
            except Exception as exc:  # noqa: BLE001 - as DSPy treats a callback's error
                log.warning("LM callback %r failed on the call's end: %s", callback, exc)


LM_CALLBACKS = LMCallbacks()


def carries_job_callbacks(lm: Any) -> bool:
    """Whether ``lm`` passes its calls on to the running job's callbacks (see LMCallbacks)."""
    return any(isinstance(c, LMCallbacks) for c in getattr(lm, "callbacks", None) or ())


def _attach_job_callbacks(lm: Any) -> None:
    callbacks = getattr(lm, "callbacks", None)
    if isinstance(callbacks, list) and not carries_job_callbacks(lm):
        callbacks.append(LM_CALLBACKS)


def _job_callbacks_on_every_lm() -> None:
    """Give every LM made in this process the dispatcher: the fleet's (worker/lm.py), and
    any a program brings (a predictor's own ``lm``, an LM passed at call time, a tool's,
    an optimized sub-program's), so that a job hears each of its LM calls whichever LM makes
    it. Through ``BaseLM.__init__`` (``dspy.LM``, ``load_state`` and every subclass that
    calls it, as DSPy asks of custom LMs) and ``dspy.LM.__setstate__`` (an unpickled LM);
    ``copy()`` and ``deepcopy`` keep it. An LM without it, as the job's LM, makes the job
    hand its callbacks to DSPy's settings instead (worker/predict.py)."""
    from dspy.clients.base_lm import BaseLM

    init = BaseLM.__init__
    if getattr(init, "_dspy_fleet_job_callbacks", False):
        return

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - the patched name
        init(self, *args, **kwargs)
        _attach_job_callbacks(self)

    setstate = dspy.LM.__setstate__

    @functools.wraps(setstate)
    def __setstate__(self: Any, state: Any) -> None:  # noqa: N807 - the patched name
        setstate(self, state)
        _attach_job_callbacks(self)

    __init__._dspy_fleet_job_callbacks = True  # type: ignore[attr-defined]
    BaseLM.__init__ = __init__
    dspy.LM.__setstate__ = __setstate__


_job_callbacks_on_every_lm()


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


__all__ = ["JOB_LM_CALLBACKS", "LM_CALLBACKS", "carries_job_callbacks", "dspy", "litellm_module"]
