"""Put jobs straight on the broker: our v1 message contract, or the bare task's kwargs."""

from __future__ import annotations

import uuid

from celery import Celery

from bench.load import Completions
from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import TASK_NAME, utcnow
from dspy_fleet.settings import CommonSettings, load_settings


class Producers:
    """Celery clients for both sides and one listener for their results."""

    def __init__(self, ours_redis: str, bare_redis: str) -> None:
        self.ours: Celery = make_celery(load_settings(CommonSettings, redis_url=ours_redis))
        self.bare: Celery = make_celery(load_settings(CommonSettings, redis_url=bare_redis))
        self.completions = Completions(ours_redis)  # pub/sub channels span databases

    def publish(self, side: str, n: int, tag: str, callback_url: str | None = None,
                program: str | None = None) -> list[str]:  # fmt: skip
        """Send ``n`` jobs with distinct questions (no cache can answer them); their ids.
        ``callback_url`` (ours only) asks for a webhook when each ends (figure j);
        ``program`` (ours only) names the program (figure k; default: the default one)."""
        ids = []
        for i in range(n):
            job_id = str(uuid.uuid4())
            question = f"What is {i} plus {i}? ({tag} {job_id[:8]})"
            if side == "ours":
                kwargs = {"v": 1, "job_id": job_id, "submitted_at": utcnow().isoformat(),
                          "input": question, "use_cache": False}  # fmt: skip
                if callback_url is not None:
                    kwargs["callback_url"] = callback_url
                if program is not None:
                    kwargs["program"] = program
                self.ours.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue="interactive")
            else:
                self.bare.send_task("bare.predict", kwargs={"question": question},
                                    task_id=job_id, queue="interactive")  # fmt: skip
            ids.append(job_id)
        return ids

    def run(
        self,
        side: str,
        n: int,
        tag: str,
        timeout: float,
        callback_url: str | None = None,
        program: str | None = None,
    ) -> tuple[list[float], int]:
        """Publish ``n`` jobs and wait for them: (completion times, jobs not succeeded)."""
        ids = self.publish(side, n, tag, callback_url, program)
        done = self.completions.wait(ids, timeout)
        failed = n - sum(1 for _, status in done if status == "SUCCESS")
        return [t for t, _ in done], failed

    def close(self) -> None:
        """Close the listener and the clients' connections."""
        self.completions.close()
        self.ours.close()
        self.bare.close()
