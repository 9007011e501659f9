"""The pacing scripts on a real redis-server: admission, bookings, the line, cuts.

Each test uses its own model name, so they share the session's Redis. Times come from
Redis's clock; the assertions are on what the scripts decide (admitted, booked slot,
place in line), with slack only where the real clock moves between two calls.
The fleet-level behaviour (a batch against a provider that answers 429) is in
tests/test_pacing.py.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store.pacing import CUT, NEWS_STEP, Limits, Pacer, Scope

# Run alone by `make test`: the rate's growth over a 1 s sleep is asserted.
pytestmark = pytest.mark.serial


def pacer(redis_server: RedisServer, limits: Limits, **kw: float) -> tuple[Pacer, str]:
    model = f"m-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    scopes = {model: [Scope(f"model:{model}", limits)]}
    kw.setdefault("burst_seconds", 1.0)  # the arithmetic below is in whole seconds of rate
    return Pacer(client, scopes, **kw), model  # type: ignore[arg-type]


def test_a_burst_is_admitted_then_slots_are_booked_one_interval_apart(
    redis_server: RedisServer,
) -> None:
    p, model = pacer(redis_server, Limits(rpm=600), horizon_seconds=60)  # 10/s, burst 10
    answers = [p.acquire(model, f"j{i}", interactive=False) for i in range(30)]
    admitted = [a for a in answers if a.admitted]
    booked = [a for a in answers if not a.admitted]
    assert len(admitted) == 10
    assert all(a.why == "booked" for a in booked)
    waits = [a.wait for a in booked]
    # One slot per 0.1 s after the burst, in the order they asked.
    assert waits == sorted(waits)
    gaps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert all(g == pytest.approx(0.1, abs=0.01) for g in gaps), gaps
    # Asking again before the slot: told the time left; the booking is kept.
    again = p.acquire(model, "j29", interactive=False)
    assert not again.admitted and again.why == "booked" and again.wait <= waits[-1]


def test_a_booking_is_honoured_when_its_slot_comes(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(rpm=60, max_concurrency=0), horizon_seconds=10)
    assert p.acquire(model, "first", interactive=False).admitted
    booked = p.acquire(model, "second", interactive=False)
    assert not booked.admitted and 0.9 <= booked.wait <= 1.0
    time.sleep(booked.wait + 0.02)
    # Its slot came: admitted without a second check, although a newcomer is not.
    assert p.acquire(model, "second", interactive=False).admitted
    assert not p.acquire(model, "third", interactive=False).admitted


def test_beyond_the_horizon_jobs_wait_in_line_in_arrival_order(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(rpm=600), horizon_seconds=1.0)
    answers = [p.acquire(model, f"j{i}", interactive=False) for i in range(60)]
    booked = [a for a in answers if not a.admitted and a.why == "booked"]
    queued = [(i, a) for i, a in enumerate(answers) if a.why == "queued"]
    assert 9 <= len(booked) <= 11  # the next second (the horizon) is booked, no more
    assert len(queued) == 60 - 10 - len(booked)
    # Each is told to come back about when its place comes up: later places, later.
    etas = [a.wait for _, a in queued]
    assert etas == sorted(etas) and etas[-1] >= 3.5
    # Coming back early keeps the place (it is not sent to the back of the line).
    first, last = queued[0][0], queued[-1][0]
    assert p.acquire(model, f"j{first}", interactive=False).wait <= etas[0] + 0.05
    assert p.acquire(model, f"j{last}", interactive=False).wait == pytest.approx(etas[-1], abs=0.1)


def test_interactive_calls_go_at_once_over_a_booked_batch_backlog(
    redis_server: RedisServer,
) -> None:
    p, model = pacer(redis_server, Limits(rpm=600), interactive_share=0.2, horizon_seconds=2)
    for i in range(100):
        p.acquire(model, f"batch{i}", interactive=False)
    assert not p.acquire(model, "late-batch", interactive=False).admitted
    # The reserve: 20 % of 10/s with 2 s of burst = 4 interactive calls at once.
    fast = [p.acquire(model, f"ui{i}", interactive=True).admitted for i in range(6)]
    assert fast[:4] == [True] * 4 and not any(fast[4:])


def test_tokens_per_minute_are_estimated_then_settled(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(tpm=6000), horizon_seconds=60)  # 100 tokens/s
    first = p.acquire(model, "a", interactive=False, tokens=100)
    assert first.admitted
    p.settle(model, "a", first, requests=1, tokens=400)  # it really cost 400
    later = p.acquire(model, "b", interactive=False, tokens=100)
    # The first call took the whole 1 s burst (100 tokens): the next would wait 1 s; the
    # 300 tokens more than estimated, charged on settling, add 3 s.
    assert not later.admitted and 3.9 <= later.wait <= 4.01


def test_concurrency_limit_holds_calls_in_flight(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(max_concurrency=2))
    a = p.acquire(model, "a", interactive=False)
    b = p.acquire(model, "b", interactive=False)
    c = p.acquire(model, "c", interactive=False)
    assert a.admitted and b.admitted and not c.admitted and c.why == "concurrency"
    p.settle(model, "a", a, requests=1, tokens=None)
    assert p.acquire(model, "c", interactive=False).admitted


def test_a_429_cuts_the_rate_once_and_drops_bookings(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(rpm=600), horizon_seconds=60)
    for i in range(20):
        p.acquire(model, f"j{i}", interactive=False)
    cuts = p.cut(model, retry_after=0.5)
    assert cuts[0].cut and cuts[0].rpm == pytest.approx(600 * CUT, rel=0.01)
    # Other 429s of calls already in flight do not cut again.
    assert not p.cut(model, retry_after=None)[0].cut
    # Bookings made at the old rate are gone: a booked job asks again and is re-planned
    # after the provider's Retry-After, at the new rate.
    again = p.acquire(model, "j15", interactive=False)
    assert not again.admitted and again.wait >= 0.4


def test_an_unconfigured_limit_is_learned_from_the_rate_that_drew_a_429(
    redis_server: RedisServer,
) -> None:
    p, model = pacer(redis_server, Limits())
    started = time.monotonic()
    for i in range(30):  # no limit: all go; the provider accepts 20 of them
        turn = p.acquire(model, f"j{i}", interactive=False)
        assert turn.admitted
        p.settle(model, f"j{i}", turn, requests=1, tokens=None, accepted=i % 3 != 0)
        time.sleep(0.04)
    elapsed = time.monotonic() - started
    first = p.cut(model, retry_after=None)[0]
    # The first 429: from the rate the calls were sent at (30 in `elapsed`), cut by CUT;
    # the first instant's accepted answers are too few to say more.
    asked_rpm = 30 / elapsed * 60
    assert first.cut and first.rpm == pytest.approx(asked_rpm * CUT, rel=0.15)
    time.sleep(1.05)  # past the guard: the next 429 cuts again
    second = p.cut(model, retry_after=None)[0]
    # Now from the rate the provider accepted (20 calls over the window, lower), but
    # never more than halved by one cut.
    assert second.cut and first.rpm * 0.5 * CUT * 0.95 <= second.rpm < first.rpm * 0.95
    # From now on it is paced: a burst beyond the learned rate's second is booked.
    burst = [p.acquire(model, f"k{i}", interactive=False).admitted for i in range(100)]
    assert 0 < sum(burst) < 100


def test_after_a_cut_the_rate_grows_back_towards_the_ceiling(redis_server: RedisServer) -> None:
    p, model = pacer(redis_server, Limits(rpm=600, tpm=60_000))
    p.cut(model, retry_after=None)
    rpm, tpm = p.rates(model)[f"model:{model}"]
    assert rpm == pytest.approx(600 * CUT, rel=0.01)
    assert tpm == pytest.approx(60_000 * CUT, rel=0.01)
    time.sleep(1.0)
    # 1 s later: 100 % - (100 % - 90 %) x e^(-1/5) of the limit = 91.8 % (5 s time constant).
    rpm, tpm = p.rates(model)[f"model:{model}"]
    assert 0.912 * 600 <= rpm <= 0.925 * 600
    assert tpm == pytest.approx(rpm * 100, rel=0.001)  # both limits move together


def test_each_change_of_the_effective_rate_is_reported_once(redis_server: RedisServer) -> None:
    """The caller logs one line per change, fleet-wide: a cut says what it cut from, and a
    climb back is reported once per NEWS_STEP of it, by the settle that saw it."""
    p, model = pacer(redis_server, Limits())
    turn = p.acquire(model, "a", interactive=False)
    assert p.settle(model, "a", turn, requests=1, tokens=None) == []  # unlimited: nothing new
    for i in range(10):
        p.settle(model, f"b{i}", p.acquire(model, f"b{i}", interactive=False), requests=1,
                 tokens=None)  # fmt: skip
    cut = p.cut(model, retry_after=None)[0]
    assert cut.cut and cut.before == 0 and cut.rpm > 0  # from unlimited to a learned rate
    # The cut is the rate last reported: settling right after it is no news.
    turn = p.acquire(model, "c", interactive=False)
    assert p.settle(model, "c", turn, requests=1, tokens=None) == []
    time.sleep(1.1)  # slow start grows a just-learned rate by 10 % a second
    turn = p.acquire(model, "d", interactive=False)
    changes = p.settle(model, "d", turn, requests=1, tokens=None)
    assert [c.scope for c in changes] == [f"model:{model}"]
    assert changes[0].before == pytest.approx(cut.rpm, rel=1e-6)
    assert changes[0].after >= changes[0].before * (1 + NEWS_STEP)
    # Reported once: the next settle (another worker's, say) has nothing new to say.
    turn = p.acquire(model, "e", interactive=False)
    assert p.settle(model, "e", turn, requests=1, tokens=None) == []
    assert p.effective_rpm(model) == pytest.approx(changes[0].after, rel=0.05)
