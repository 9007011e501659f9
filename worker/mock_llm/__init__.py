"""OpenAI-compatible mock LLM server: deterministic answers to DSPy prompts, fault injection."""

from worker.mock_llm.faults import Faults
from worker.mock_llm.server import MockLLMServer, build_server

__all__ = ["Faults", "MockLLMServer", "build_server"]
