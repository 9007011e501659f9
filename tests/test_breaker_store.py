"""The breaker's Redis scripts on a real redis-server: how outcomes are booked.

The fleet-level behaviour (bursts, /ready, the worker's gauge) is in
tests/test_breaker_books.py; these pin down the rules one record at a time.
"""

from __future__ import annotations

import time
import uuid

import redis

from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store.breakers import PREFIX, BreakerBoard, BreakerPolicy, read_states


def _board(
    redis_server: RedisServer, max_call_seconds: float = 300.0, **policy: float
) -> tuple[BreakerBoard, str, redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    model = f"m-{uuid.uuid4().hex[:8]}"
    base = {"failure_threshold": 3, "min_calls": 1000, "recovery_seconds": 0.5}
    policies = {model: BreakerPolicy(**{**base, **policy})}
    return BreakerBoard(client, policies, max_call_seconds), model, client


def test_faults_in_a_row_are_counted_in_admission_order(redis_server: RedisServer) -> None:
    board, model, _ = _board(redis_server)
    calls = [board.allow(model).call for _ in range(6)]
    assert calls == [1, 2, 3, 4, 5, 6]
    # Three faults reach Redis before any success (their successes are still being
    # parsed), but calls 2 and 4 between them are not faults: not three in a row.
    for call in (1, 3, 5):
        assert board.record(model, ok=False, call=call) == "closed"
    assert board.record(model, ok=True, call=2) == "closed"
    assert board.record(model, ok=True, call=6) == "closed"
    # Call 4 faulted too: 3, 4, 5 are three in a row, whatever order they came in (and
    # with nothing else in flight, the order is not in doubt: it opens at once).
    assert board.record(model, ok=False, call=4) == "open"
    assert board.record(model, ok=True, call=7) == "open"  # open: late outcomes change nothing
    assert not board.allow(model).allowed


def test_a_burst_s_faults_recorded_first_do_not_inflate_the_rate(
    redis_server: RedisServer,
) -> None:
    board, model, client = _board(redis_server, failure_rate=0.5, min_calls=4)
    calls = [board.allow(model).call for _ in range(10)]  # all in flight together
    # Their faults are recorded first (a success is parsed before it is recorded): the
    # rate is 3 of the 10 calls made, not 3 of 3 outcomes seen so far.
    for call in (1, 4, 7):
        assert board.record(model, ok=False, call=call) == "closed"
    for call in set(calls) - {1, 4, 7}:
        assert board.record(model, ok=True, call=call) == "closed"
    window = [client.hgetall(k) for k in client.keys(PREFIX + model + ":w:*")]
    assert sum(int(w[b"calls"]) for w in window) == 10
    assert sum(int(w.get(b"failures", 0)) for w in window) == 3
    # Half of the calls failing does open it (never three in a row: by the rate).
    more = [board.allow(model).call for _ in range(10)]
    states = [board.record(model, ok=False, call=more[i]) for i in (0, 1, 3, 4, 6, 7, 9)]
    assert states == ["closed"] * 6 + ["open"]  # 10 faults of 20 calls


def test_open_reads_as_half_open_after_the_recovery_window(redis_server: RedisServer) -> None:
    board, model, client = _board(redis_server)
    for _ in range(3):
        board.record(model, ok=False, call=board.allow(model).call)
    assert read_states(client, [model, "never-used"]) == {model: "open", "never-used": "closed"}
    time.sleep(0.6)
    assert read_states(client, [model]) == {model: "half_open"}
    assert client.hget(PREFIX + model, "state") == b"open"  # reading changed nothing
    probe = board.allow(model)
    assert probe.allowed and probe.state == "half_open"
    assert board.record(model, ok=False, call=probe.call) == "open"  # a failed probe reopens
    assert read_states(client, [model]) == {model: "open"}  # with a new recovery window


def test_half_open_closes_on_successes_with_a_clean_slate(redis_server: RedisServer) -> None:
    board, model, client = _board(redis_server, success_threshold=2, half_open_max_calls=2)
    for _ in range(3):
        board.record(model, ok=False, call=board.allow(model).call)
    time.sleep(0.6)
    probes = [board.allow(model) for _ in range(3)]
    assert [p.allowed for p in probes] == [True, True, False]
    assert board.record(model, ok=True, call=probes[0].call) == "half_open"
    assert board.record(model, ok=True, call=probes[1].call) == "closed"
    assert not client.exists(PREFIX + model + ":faults")
    # The faults that opened it are forgotten: two more do not make three in a row.
    for _ in range(2):
        assert board.record(model, ok=False, call=board.allow(model).call) == "closed"
    assert board.record(model, ok=False, call=board.allow(model).call) == "open"


def test_an_unnumbered_fault_still_counts(redis_server: RedisServer) -> None:
    # A call allowed while the breaker store was unreachable has no number (0).
    board, model, _ = _board(redis_server)
    assert [board.record(model, ok=False) for _ in range(3)] == ["closed", "closed", "open"]


def test_unnumbered_outcomes_are_judged_in_record_order(redis_server: RedisServer) -> None:
    # The worker records each outcome as the provider answers, without a number: "in a
    # row" is then the faults recorded since the last recorded success.
    board, model, _ = _board(redis_server)
    burst = [board.allow(model).call for _ in range(5)]  # admissions do not break a run
    faults = [board.record(model, ok=False, admitted=burst[i]) for i in range(2)]
    assert faults == ["closed", "closed"]
    assert board.record(model, ok=True, admitted=burst[2]) == "closed"  # no run of three
    faults = [board.record(model, ok=False, admitted=burst[i]) for i in (3, 4)]
    assert faults == ["closed", "closed"]
    later = board.allow(model).call  # admissions between faults do not break it either
    assert board.record(model, ok=False, admitted=later) == "open"


def test_calls_their_admission_did_not_count_are_counted_when_recorded(
    redis_server: RedisServer,
) -> None:
    board, model, client = _board(redis_server, failure_rate=0.5, min_calls=4)
    board.allow(model)  # one job, admitted once (counted), making two provider calls
    assert board.record(model, ok=True) == "closed"
    assert board.record(model, ok=False, uncounted=True) == "closed"
    window = [client.hgetall(k) for k in client.keys(PREFIX + model + ":w:*")]
    assert sum(int(w[b"calls"]) for w in window) == 2
    assert sum(int(w.get(b"failures", 0)) for w in window) == 1


def test_a_success_recorded_while_a_call_was_in_flight_breaks_its_run(
    redis_server: RedisServer,
) -> None:
    # A burst: all admitted together; the answers come back within a millisecond of each
    # other and the faults (a shorter path) are recorded in a cluster after a success.
    board, model, _ = _board(redis_server)
    burst = [board.allow(model) for _ in range(6)]
    assert board.record(model, ok=True, seen=burst[0].oks, admitted=burst[0].call) == "closed"
    for d in burst[1:4]:  # three faults recorded in a row, but the provider was answering
        assert board.record(model, ok=False, seen=d.oks, admitted=d.call) == "closed"
    # The last of them starts a run (the success may have come before it, not after).
    # Calls admitted after that success see no success during their flight: they extend
    # it, and the second makes three in a row: opening once burst[4:] are not in flight.
    later = [board.allow(model) for _ in range(2)]
    for d in burst[4:]:
        board.release(model, d.call)
    states = [board.record(model, ok=False, seen=d.oks, admitted=d.call) for d in later]
    assert states == ["closed", "open"]


def test_faults_recorded_before_the_successes_answered_among_them_do_not_open(
    redis_server: RedisServer,
) -> None:
    # The CI failure this rule was built for: a burst whose first three outcomes recorded
    # were faults (a success is parsed before it is recorded, and 150 threads share one
    # CPU), the provider having failed every 5th call, never two in a row.
    board, model, client = _board(redis_server, settle_seconds=30)
    burst = [board.allow(model) for _ in range(15)]
    faults, successes = burst[4::5], [d for i, d in enumerate(burst) if i % 5 != 4]
    for d in faults:
        assert board.record(model, ok=False, seen=d.oks, admitted=d.call) == "closed"
    assert read_states(client, [model]) == {model: "closed"}  # a run, not yet settled
    for d in successes:
        assert board.record(model, ok=True, seen=d.oks, admitted=d.call) == "closed"
    assert board.allow(model).allowed
    assert client.hget(PREFIX + model, "opens_at") is None  # the successes ended the run


def test_a_run_with_calls_in_flight_opens_once_it_has_settled(redis_server: RedisServer) -> None:
    board, model, client = _board(redis_server, settle_seconds=0.4)
    burst = [board.allow(model) for _ in range(5)]
    states = [board.record(model, ok=False, seen=d.oks, admitted=d.call) for d in burst[:3]]
    assert states == ["closed"] * 3  # two calls still in flight: their answers may be ok
    assert board.allow(model).allowed  # not settled yet
    time.sleep(0.5)
    assert read_states(client, [model]) == {model: "open"}  # the truth, before any call
    refused = board.allow(model)
    assert not refused.allowed and refused.state == "open"
    assert refused.retry_after == 0.5  # the recovery window, from the opening
    # The late outcomes change nothing.
    assert board.record(model, ok=True, seen=burst[3].oks, admitted=burst[3].call) == "open"


def test_a_burst_failing_every_call_opens_at_its_last_fault(redis_server: RedisServer) -> None:
    # A provider failing every call of a burst: the run is in no doubt once no call is in
    # flight, with no settle time to wait.
    board, model, _ = _board(redis_server, settle_seconds=30)
    burst = [board.allow(model) for _ in range(6)]
    states = [board.record(model, ok=False, seen=d.oks, admitted=d.call) for d in burst]
    assert states == ["closed"] * 5 + ["open"]


def test_admissions_that_never_reached_the_provider_are_not_in_flight(
    redis_server: RedisServer,
) -> None:
    board, model, _ = _board(redis_server, settle_seconds=30)
    throttled = board.allow(model)  # the pacer sent it back: released
    board.release(model, throttled.call)
    states = [board.record(model, ok=False, admitted=board.allow(model).call) for _ in range(3)]
    assert states == ["closed", "closed", "open"]


def test_an_admission_never_heard_of_is_forgotten_after_the_longest_call(
    redis_server: RedisServer,
) -> None:
    board, model, _ = _board(redis_server, max_call_seconds=0.3, settle_seconds=30)
    board.allow(model)  # its worker was killed: no outcome, no release
    states = [board.record(model, ok=False, admitted=board.allow(model).call) for _ in range(3)]
    assert states == ["closed"] * 3  # the lost call might still answer
    time.sleep(0.4)
    assert board.record(model, ok=False, admitted=board.allow(model).call) == "open"
