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
    return litellm


__all__ = ["dspy", "litellm_module"]
