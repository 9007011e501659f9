"""Benchmarks of dspy-fleet against bare Celery/Flask baselines measured in the same run.

``python -m bench [--quick|--smoke]`` starts its own Redis, mock LLM, workers and
APIs on free ports, prints one line per figure and stops everything it started.
"""
