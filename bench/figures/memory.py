"""(g) Memory: peak RSS (VmHWM) of an API gunicorn worker and of a worker at concurrency 64."""

from __future__ import annotations

from bench.context import Bench
from bench.report import Figure
from bench.stack import child_pids, peak_rss_mb


def worker(b: Bench) -> list[Figure]:
    """After the worker figures: our Celery worker vs the bare one (both threads, c64)."""
    ours = peak_rss_mb(b.stack.children["ours-worker"].pid)
    bare = peak_rss_mb(b.stack.children["bare-worker"].pid)
    return [Figure("g_worker_peak_rss", ours, "MB", bare, "MB bare Celery worker", "<= 160 MB",
                   ours <= 160)]  # fmt: skip


def api(b: Bench) -> list[Figure]:
    """After the API figures: the largest gunicorn worker of ours vs of the bare app."""

    def largest(name: str) -> float:
        return max(peak_rss_mb(pid) for pid in child_pids(b.stack.children[name].pid))

    ours, bare = largest("ours-api"), largest("bare-api")
    return [Figure("g_api_worker_peak_rss", ours, "MB", bare, "MB bare Flask gunicorn worker",
                   "<= 70 MB", ours <= 70)]  # fmt: skip
