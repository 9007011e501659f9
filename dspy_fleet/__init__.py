"""dspy-fleet's shared core: the job contract, settings, Redis key spaces and the broker.

Imported by both processes (``api/``, Flask; ``worker/``, Celery + DSPy), by direct
producers and by the SDK. It imports neither Flask nor DSPy, and this package's
``__init__`` imports nothing heavy, so ``import dspy_fleet.client`` stays light.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dspy-fleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
