"""worker/dspy_env.py's guard on LiteLLM's service hooks: no event loop per call when idle."""

from __future__ import annotations

from typing import Any

import pytest

from worker.dspy_env import litellm_module


def test_service_hooks_run_only_with_a_service_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = litellm_module()
    from litellm._service_logger import ServiceLogging
    from litellm.types.services import ServiceTypes

    loops: list[str] = []

    def dispatch(hook: Any) -> None:  # where LiteLLM starts an event loop per event
        coro = hook()
        loops.append(coro.__qualname__)
        coro.close()

    monkeypatch.setattr(ServiceLogging, "_dispatch_from_sync", staticmethod(dispatch))
    logger = ServiceLogging()

    monkeypatch.setattr(litellm, "service_callback", [])
    logger.service_success_hook(service=ServiceTypes.REDIS, duration=0.1, call_type="get")
    logger.service_failure_hook(service=ServiceTypes.REDIS, duration=0.1,
                                error=RuntimeError("x"), call_type="get")  # fmt: skip
    assert loops == []

    # A configured service callback still gets both events, as without the guard.
    monkeypatch.setattr(litellm, "service_callback", ["prometheus_system"])
    logger.service_success_hook(service=ServiceTypes.REDIS, duration=0.1, call_type="get")
    logger.service_failure_hook(service=ServiceTypes.REDIS, duration=0.1,
                                error=RuntimeError("x"), call_type="get")  # fmt: skip
    assert len(loops) == 2
