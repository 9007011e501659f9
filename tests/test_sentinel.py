"""Redis Sentinel configuration and replica-confirmed acceptance (issue 20).

The URL form and its translation for kombu and Celery are checked as data; acceptance
with DSPY_FLEET_ACCEPT_MIN_REPLICAS runs against a real master and a real replica. The
failover itself is tests/chaos/test_sentinel_failover.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from dspy_fleet.broker.celery_config import celery_config
from dspy_fleet.devtools.procs import wait_until
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.devtools.sentinel import SentinelTopology
from dspy_fleet.errors import ConfigError
from dspy_fleet.settings import CommonSettings, load_settings
from dspy_fleet.store import replication
from dspy_fleet.store.connection import SentinelUrl, parse_sentinel_url, redis_client
from dspy_fleet.store.jobs import JobStore

URL = "redis+sentinel://:data%40pw@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/mymaster/2"


def test_the_sentinel_url_names_sentinels_master_db_and_the_data_password() -> None:
    assert parse_sentinel_url(URL) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        master_name="mymaster",
        db=2,
        username=None,
        password="data@pw",
    )
    assert parse_sentinel_url("redis+sentinel://[::1]:5000/m").sentinels == (("::1", 5000),)
    assert parse_sentinel_url("redis+sentinel://u:p@h/m").username == "u"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel:///mymaster/0", "no Sentinel host"),
        ("redis+sentinel://h:26379", "/master_name[/db]"),
        ("redis+sentinel://h:26379/m/0/extra", "/master_name[/db]"),
        ("redis+sentinel://h:26379/m/zero", "bad db number"),
        ("redis+sentinel://h:port/m", "bad port"),
    ],
)
def test_a_malformed_sentinel_url_fails_at_start_up_naming_the_problem(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match="DSPY_FLEET_REDIS_URL") as caught:
        load_settings(CommonSettings, redis_url=url)
    assert says in str(caught.value)


def test_a_bad_url_with_a_password_is_named_without_showing_the_password() -> None:
    with pytest.raises(ConfigError, match="DSPY_FLEET_BROKER_URL") as caught:
        load_settings(CommonSettings, broker_url="redis+sentinel://:hunter2@h/m/x")
    assert "hunter2" not in str(caught.value)


def test_celery_gets_kombus_sentinel_urls_the_master_name_and_the_sentinel_password() -> None:
    settings = load_settings(
        CommonSettings, redis_url=URL, sentinel_password="s3cret", redis_timeout_seconds=1.5
    )
    conf = celery_config(settings)
    sentinels = ";".join(
        f"sentinel://:data%40pw@{h}/2" for h in ("10.0.0.1:26379", "10.0.0.2:26380",
                                                  "sentinel-3:26379")
    )  # fmt: skip
    assert conf["broker_url"] == sentinels and conf["result_backend"] == sentinels
    kwargs = {"password": "s3cret", "socket_timeout": 1.5, "socket_connect_timeout": 1.5}
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert conf[key]["master_name"] == "mymaster"
        assert conf[key]["sentinel_kwargs"] == kwargs
    # The broker's own options survive the translation.
    assert conf["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout
    # A plain URL is left alone.
    plain = celery_config(load_settings(CommonSettings, redis_url="redis://h:6379/0"))
    assert plain["broker_url"] == "redis://h:6379/0"
    assert "master_name" not in plain["broker_transport_options"]


# --- acceptance confirmed by replicas (Redis WAIT) -----------------------------------------


@pytest.fixture(scope="module")
def master_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A master with one replica in sync; yields the master."""
    logs = tmp_path_factory.mktemp("wait")
    master = RedisServer(log_path=logs / "master.log").start()
    replica = RedisServer(log_path=logs / "replica.log",
                          args=["--replicaof", "127.0.0.1", str(master.port)]).start()  # fmt: skip
    probe = redis.Redis(port=replica.port)
    wait_until(lambda: probe.info("replication").get("master_link_status") == "up", 20, "sync")
    yield master
    replica.stop()
    master.stop()


def _client(server: RedisServer, tmp_path: Path, replicas: int) -> FlaskClient:
    from api import create_app

    settings: dict[str, Any] = {
        "redis_url": server.url,
        "accept_min_replicas": replicas,
        "accept_replica_timeout_ms": 200,
    }
    app = create_app({"keep_logging": True, "settings": settings})
    return app.test_client()


def test_a_job_one_replica_confirmed_is_accepted(
    master_and_replica: RedisServer, tmp_path: Path
) -> None:
    client = _client(master_and_replica, tmp_path, replicas=1)
    resp = client.post("/v1/predict", json={"input": "confirmed?", "use_cache": False})
    assert resp.status_code == 202, resp.get_json()


def test_fewer_replicas_than_required_is_a_503_and_the_job_stays_one_job(
    master_and_replica: RedisServer, tmp_path: Path
) -> None:
    client = _client(master_and_replica, tmp_path, replicas=2)  # only one replica exists
    body = {"input": "two replicas?", "use_cache": False, "request_id": "wait-2"}
    resp = client.post("/v1/predict", json=body)
    assert resp.status_code == 503
    error = resp.get_json()["error"]
    assert error["code"] == "replication_unconfirmed"
    assert error["details"]["replicas_confirmed"] == 1
    assert error["details"]["replicas_required"] == 2
    job_id = error["details"]["job_id"]
    # Recorded on the master (it may still run), and a retry names the same job: never two.
    rds = redis.Redis.from_url(master_and_replica.url, decode_responses=True)
    assert rds.hget(f"dspy_fleet:job:{job_id}", "status") == "queued"
    again = client.post("/v1/predict", json=body)
    assert again.status_code == 503
    assert again.get_json()["error"]["details"]["job_id"] == job_id
    # With the requirement met the same request_id gets its job, the one recorded first.
    ok = _client(master_and_replica, tmp_path, replicas=1).post("/v1/predict", json=body)
    assert ok.status_code in (200, 202) and ok.get_json()["id"] == job_id


# --- the API's wait subscriber follows a failover ----------------------------------------


def test_the_wait_subscriber_resubscribes_on_the_promoted_master(tmp_path: Path) -> None:
    """A request held by ``wait`` across a failover is woken by a notification published on
    the new master: the subscriber found it through the Sentinels. (The waiter's own sweep
    is set to an hour, so only the notification can wake it in time.) The job store's Lua
    scripts work on the new master too."""
    from api.waiter import JobWaiter

    with SentinelTopology(tmp_path / "sentinel") as topo:
        client = redis_client(topo.url, sentinel_password=topo.sentinel_password,
                              decode_responses=True, socket_timeout=1,
                              socket_connect_timeout=1)  # fmt: skip
        store = JobStore(client, 3600)
        waiter = JobWaiter(client, store, recheck_seconds=3600)
        store.create("held", {"program": "qa"})
        assert replication.confirm(client, 2, 2000) == 2  # the record survives the kill
        outcome: dict[str, Any] = {}
        held = threading.Thread(target=lambda: outcome.update(waiter.wait("held", 60) or {}))
        held.start()
        wait_until(waiter.listening.is_set, 10, "the subscriber")
        old = topo.kill_master()
        topo.wait_promoted(old)
        wait_until(waiter.listening.is_set, 20, "the subscriber on the new master")
        # The promoted replica never loaded the store's Lua scripts (Redis 7 replicates
        # their effects): the first EVALSHA gets NOSCRIPT and redis-py loads the script.
        assert client.script_exists(store._create.sha) == [False]
        assert store.create("after", {"program": "qa"}) is True
        client.hset(JobStore.key("held"), "status", "succeeded")
        published = time.monotonic()
        client.publish(waiter.channel, "held")
        held.join(timeout=10)
        waiter.close()
        assert outcome.get("status") == "succeeded"
        assert time.monotonic() - published < 5
