"""Webhooks: where a callback may go (urls.py) and how its body is signed (signing.py).

No flask, dspy or redis here: the API, the worker and a receiver's tests import these.
"""
