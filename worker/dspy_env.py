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

import functools  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import dspy  # noqa: E402

# Our own cache (keyed on program version, model and parameters) replaces DSPy's.
dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
# DSPy keeps every call in an in-memory history by default: a leak in a long-lived worker.
dspy.configure(disable_history=True)


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
