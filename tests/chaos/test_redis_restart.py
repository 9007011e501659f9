"""Redis (AOF on) restarts in the middle of a run: no accepted job is lost, nothing answers 500."""

from __future__ import annotations

import time
from collections import Counter

import httpx

from tests.chaos.conftest import ChaosStack, SubmitStream, assert_billed_once


def test_redis_restart_mid_run(chaos: ChaosStack) -> None:
    chaos.mock.set_faults(latency_ms=50)
    with chaos.together():
        worker = chaos.start_worker()
        api = chaos.start_api()
    with SubmitStream(api.url, prefix="r", refused_pause=0.05) as stream:
        time.sleep(3)
        before = len(stream.accepted)
        chaos.redis_server.stop()  # SIGTERM: Redis writes its AOF and exits
        t_down = time.monotonic()
        time.sleep(3)
        chaos.redis_server.start()  # same port, same data directory: the AOF is replayed
        downtime = time.monotonic() - t_down
        time.sleep(4)
    accepted, codes, errors = stream.accepted, stream.codes, stream.refusals
    print(
        f"\n{before} jobs accepted before the restart, {len(accepted)} in all; Redis down "
        f"{downtime:.1f} s; responses {dict(codes)}; refusals {dict(errors)}"
    )
    assert codes[500] == 0 and codes[0] == 0
    assert codes[503] > 0 and set(errors) <= {"broker_unavailable", "redis_unavailable"}
    # The job store's Redis refusing the record is the cause, whichever route saw it.
    assert errors["redis_unavailable"] > 0
    final = chaos.wait_all(accepted, timeout=120)
    lost = [j for j, s in final.items() if s != "succeeded"]
    assert not lost, f"{len(lost)} accepted jobs did not succeed: {Counter(final.values())}"
    # Recovered without restarting anything.
    assert worker.child.alive() and api.child.alive()
    assert httpx.get(api.url + "/ready", timeout=10).status_code == 200
    # A submission cut off by the outage after Redis stored the job (the reply was lost)
    # was answered 503, yet the job exists and runs: the ledger is checked against every
    # job Redis holds. (Clients that retry with a request_id get that same job back.)
    recorded = chaos.all_job_ids()
    extra = len(recorded) - len(accepted)
    assert set(accepted) <= set(recorded)
    assert chaos.wait_all(recorded, timeout=60) and extra <= errors["redis_unavailable"]
    assert_billed_once(chaos.records(recorded), chaos.costs())
    print(
        f"all {len(accepted)} accepted jobs succeeded ({extra} more were stored although "
        "their client saw 503); API and worker never restarted; billed once"
    )
