"""Run the mock LLM server: `python -m worker.mock_llm --port 0`."""

from worker.mock_llm.cli import command

if __name__ == "__main__":
    command(prog_name="python -m worker.mock_llm")
