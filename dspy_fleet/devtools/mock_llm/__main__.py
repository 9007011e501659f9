"""Run the mock LLM server: `python -m dspy_fleet.devtools.mock_llm --port 0`."""

from dspy_fleet.devtools.mock_llm.cli import command

if __name__ == "__main__":
    command(prog_name="python -m dspy_fleet.devtools.mock_llm")
