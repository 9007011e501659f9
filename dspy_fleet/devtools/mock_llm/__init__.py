"""OpenAI-compatible mock LLM server: deterministic answers to DSPy prompts, fault injection."""

from dspy_fleet.devtools.mock_llm.faults import Faults
from dspy_fleet.devtools.mock_llm.server import MockLLMServer, build_server

__all__ = ["Faults", "MockLLMServer", "build_server"]
