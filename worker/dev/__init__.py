"""Run the whole stack on one machine: `dspy-fleet dev`, `make run` and the test suite."""
