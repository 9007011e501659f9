"""dspy-fleet worker: the Celery app, the job contract and everything that runs DSPy programs."""
