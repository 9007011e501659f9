"""Bare baselines: the least code that does the same job, under our gunicorn/Celery settings."""
