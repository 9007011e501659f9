"""Webhooks: signed callbacks, delivered once each, from the workers, never to a private address.

A real fleet (Redis, the mock LLM, two Celery workers, the API) and a small receiver
written here: an HTTP server on 127.0.0.1 that checks each delivery's signature with its
own HMAC (not the project's code), answers 401 to a bad one, and counts deliveries per
job id. The receiver runs on loopback, so the fleet allow-lists 127.0.0.1
(DSPY_FLEET_CALLBACK_ALLOW); the refusals without an allow-list are checked on an API
app built in this process. Retries are fast here (0.2 s backoff up to 0.5 s, 20 s budget) so that a
receiver that is down for a few seconds, then up, is over in seconds, not an hour.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from dspy_fleet.broker.celery_config import CALLBACK_QUEUE, CALLBACK_TASK
from dspy_fleet.broker.producer import Producer
from dspy_fleet.client import FleetClient
from dspy_fleet.settings import CommonSettings
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.webhooks import signing
from tests.conftest import OwnStack, poll, running_fleet
from tests.stub_provider import BurstServer
from tests.test_cache_and_costs import metric_value

SECRET = f"whsec-{uuid.uuid4().hex}"
RETRY_BUDGET = 20.0
README = Path(__file__).resolve().parents[1] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on 127.0.0.1 that can be taken down and brought back on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.by_id: Counter[str] = Counter()  # verified deliveries per job or batch id
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.delivery_ids: dict[str, set[str]] = {}
        self.rejected = 0
        self.server: BurstServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 204 if receiver.accept(dict(self.headers.items()), body) else 401
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = BurstServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop listening: a connection to the port is refused."""
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def accept(self, headers: dict[str, str], body: bytes) -> bool:
        """Verify the signature independently of the project's code, then count it."""
        stamp = headers.get(signing.TIMESTAMP_HEADER, "")
        given = headers.get(signing.SIGNATURE_HEADER, "")
        mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
        fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
        if not fresh or not hmac.compare_digest("v1=" + mac.hexdigest(), given):
            with self.lock:
                self.rejected += 1
            return False
        data = json.loads(body)
        with self.lock:
            self.by_id[data["id"]] += 1
            self.bodies.setdefault(data["id"], []).append(data)
            self.delivery_ids.setdefault(data["id"], set()).add(
                headers.get(signing.DELIVERY_HEADER, "")
            )
        return True

    def count(self, ident: str) -> int:
        with self.lock:
            return self.by_id[ident]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    rec.up()
    yield rec
    if rec.server is not None:
        rec.down()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    env = {
        "DSPY_FLEET_CALLBACK_ALLOW": "127.0.0.1/32",
        "DSPY_FLEET_CALLBACK_SECRETS": json.dumps({"anonymous": SECRET}),
        "DSPY_FLEET_CALLBACK_BACKOFF_SECONDS": "0.2",
        "DSPY_FLEET_CALLBACK_BACKOFF_MAX_SECONDS": "0.5",
        "DSPY_FLEET_CALLBACK_RETRY_SECONDS": str(RETRY_BUDGET),
        "DSPY_FLEET_CALLBACK_TIMEOUT_SECONDS": "2",
        "DSPY_FLEET_CALLBACK_CONCURRENCY": "8",
    }
    with running_fleet(tmp_path_factory.mktemp("webhooks"), **env) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(fleet: OwnStack) -> Iterator[httpx.Client]:
    assert fleet.api is not None
    with httpx.Client(base_url=fleet.api.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def doomed(client: httpx.Client) -> str:
    """A job whose receiver never listens, submitted first: its retry budget runs out while
    the other tests run."""
    return submit(client, f"http://127.0.0.1:{free_port()}/never-listens", "nobody hears this")


def submit(client: httpx.Client, callback_url: str, question: str) -> str:
    resp = client.post("/v1/predict", json={"input": question, "callback_url": callback_url,
                                            "use_cache": False})  # fmt: skip
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def callback_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    body = client.get(f"/v1/predictions/{job_id}").json()
    return dict(body["callback"])


def test_a_signed_callback_carries_what_polling_returns(
    client: httpx.Client, receiver: Receiver, doomed: str
) -> None:
    job_id = submit(client, receiver.url, "what is 2+2?")
    poll(lambda: receiver.count(job_id), timeout=15)
    polled = poll(lambda: (b := client.get(f"/v1/predictions/{job_id}").json())
                  ["callback"]["status"] == "delivered" and b)  # fmt: skip
    assert polled["callback"] == {"status": "delivered", "attempts": 1, "last_error": None}
    (sent,) = receiver.bodies[job_id]
    assert sent["status"] == "succeeded" and sent["outputs"]
    # The body is the polling body (the callback state then said: attempt 1 under way).
    assert sent["callback"] == {"status": "pending", "attempts": 1, "last_error": None}
    assert {k: v for k, v in sent.items() if k != "callback"} == {
        k: v for k, v in polled.items() if k != "callback"
    }


def test_the_receiver_rejects_a_tampered_body(receiver: Receiver) -> None:
    body = json.dumps({"id": "tampered", "status": "succeeded"}).encode()
    headers = signing.sign(SECRET, body)
    # The project's signature is exactly the independent HMAC the receiver computes.
    mac = hmac.new(SECRET.encode(), headers[signing.TIMESTAMP_HEADER].encode() + b"." + body,
                   hashlib.sha256).hexdigest()  # fmt: skip
    assert headers[signing.SIGNATURE_HEADER] == f"v1={mac}"
    ok = httpx.post(receiver.url, content=body, headers=headers)
    assert ok.status_code == 204
    forged = body.replace(b"succeeded", b"failed")
    before = receiver.rejected
    bad = httpx.post(receiver.url, content=forged, headers=headers)
    assert bad.status_code == 401 and receiver.rejected == before + 1
    assert not signing.verify(SECRET, headers, forged)
    assert signing.verify(SECRET, headers, body)
    assert not signing.verify("another-secret", headers, body)


def test_the_readme_snippet_verifies_a_delivery() -> None:
    # The README's receiver code, run as written (stdlib only), on a signed body.
    snippet = re.search(r"```python\n(# verify a dspy-fleet webhook.*?)```", README.read_text(),
                        re.S)  # fmt: skip
    assert snippet, "README's webhook verification snippet is missing"
    scope: dict[str, Any] = {}
    exec(compile(snippet.group(1), "README.md", "exec"), scope)  # noqa: S102
    body = b'{"id":"x","status":"succeeded"}'
    headers = signing.sign(SECRET, body)
    assert scope["verify"](SECRET, headers, body) is True
    assert scope["verify"](SECRET, headers, body + b" ") is False


def test_receiver_down_then_up_every_callback_arrives_exactly_once(
    fleet: OwnStack, client: httpx.Client, receiver: Receiver
) -> None:
    receiver.down()
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: submit(client, receiver.url, f"q {i} {uuid.uuid4().hex}"),
                            range(100)))  # fmt: skip
    rds = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    store = JobStore(rds, 3600)

    def known_failing() -> bool:
        # Every job ended and its callback is pending, showing the receiver's failure: the
        # first callbacks were attempted and refused; the others wait for the host's probe
        # (one attempt per backoff step, not one per callback) and say why they wait.
        pipe = rds.pipeline()
        for job_id in ids:
            pipe.hmget(store.key(job_id), "status", "callback_status", "callback_last_error")
        return all(status == "succeeded" and cb != "delivered" and "127.0.0.1" in (err or "")
                   for status, cb, err in pipe.execute())  # fmt: skip

    poll(known_failing, timeout=20, interval=0.2)
    time.sleep(0.5)  # a few probes more, all refused
    assert sum(receiver.by_id[j] for j in ids) == 0
    sample = callback_of(client, ids[-1])
    assert sample["status"] == "pending" and "connection to 127.0.0.1 failed" in (
        sample["last_error"] or ""
    )
    attempts = sum(int(rds.hget(store.key(j), "callback_attempts") or 0) for j in ids)
    assert 1 <= attempts < len(ids), attempts  # probed, not hammered

    # Duplicated delivery tasks, racing the sweep's own: claim lets one attempt through.
    celery = Celery(broker=fleet.redis_url)
    for job_id in ids:
        attempts = int(rds.hget(store.key(job_id), "callback_attempts") or 0)
        for attempt in (attempts + 1, attempts + 1):
            celery.send_task(CALLBACK_TASK, kwargs={"member": f"job:{job_id}", "attempt": attempt},
                             queue=CALLBACK_QUEUE)  # fmt: skip
    receiver.up()
    down_for = time.monotonic() - t0
    try:
        poll(lambda: all(receiver.count(j) for j in ids), timeout=RETRY_BUDGET, interval=0.1)
    except AssertionError:
        missing = {j: rds.hgetall(store.key(j)) for j in ids if not receiver.count(j)}
        raise AssertionError(f"down {down_for:.1f}s; not delivered: {missing}") from None
    print(
        f"receiver down {down_for:.1f}s; all delivered {time.monotonic() - t0 - down_for:.1f}s "
        "after it came back"
    )
    time.sleep(1.0)  # room for a duplicate to arrive, if one were going to
    counts = {j: receiver.count(j) for j in ids}
    assert set(counts.values()) == {1}, {j: n for j, n in counts.items() if n != 1}
    assert all(len(receiver.delivery_ids[j]) == 1 for j in ids)
    assert receiver.rejected == 1  # only the tampered body of the test before
    for job_id in ids[:10]:
        state = callback_of(client, job_id)
        assert state["status"] == "delivered" and state["attempts"] >= 1, state
        assert "127.0.0.1" in (state["last_error"] or "")  # what it went through
    # The operator sees it too: the worker counted each POST by its outcome.
    text = "".join(w.metrics() for w in fleet.workers)
    delivered = metric_value(text, "dspy_webhook_attempts_total", outcome="delivered")
    retried = metric_value(text, "dspy_webhook_attempts_total", outcome="retry")
    assert delivered >= len(ids) and retried >= 1, (delivered, retried)


def test_a_batch_calls_back_once_when_it_ends_with_its_counts(
    client: httpx.Client, receiver: Receiver
) -> None:
    items = [{"custom_id": f"c{i}", "input": f"batch q {i} {uuid.uuid4().hex}"} for i in range(5)]
    items.append({"custom_id": "bad", "inputs": "not an object"})
    with FleetClient(base_url=str(client.base_url)) as sdk:  # the SDK's batch(callback_url=)
        created = sdk.batch(items, callback_url=receiver.url, callback_items=True)
    batch_id = created.id
    body = poll(lambda: receiver.count(batch_id) and receiver.bodies[batch_id][0], timeout=15)
    assert body["object"] == "batch" and body["status"] == "completed"
    assert body["counts"] == {"total": 6, "succeeded": 5, "failed": 1, "cancelled": 0,
                              "pending": 0}  # fmt: skip
    # Each valid item was called back too (callback_items), once.
    item_ids = [line["id"] for line in map(json.loads, client.get(
        f"/v1/batches/{batch_id}/results").text.splitlines()) if line["id"]]  # fmt: skip
    assert len(item_ids) == 5
    poll(lambda: all(receiver.count(j) for j in item_ids), timeout=10)
    time.sleep(1.0)
    assert receiver.count(batch_id) == 1 and all(receiver.count(j) == 1 for j in item_ids)
    state = client.get(f"/v1/batches/{batch_id}").json()["callback"]
    assert state == {"status": "delivered", "attempts": 1, "last_error": None}


def test_a_direct_producer_message_may_carry_a_callback(
    fleet: OwnStack, receiver: Receiver
) -> None:
    settings = CommonSettings(redis_url=fleet.redis_url)
    with Producer(settings) as producer:
        job_id = producer.submit({"input": "from a producer", "callback_url": receiver.url})
    poll(lambda: receiver.count(job_id), timeout=15)
    (sent,) = receiver.bodies[job_id]
    # No API saw this job: its links are paths.
    assert sent["status_url"] == f"/v1/predictions/{job_id}"


def test_a_callback_whose_budget_runs_out_is_marked_failed(
    client: httpx.Client, doomed: str
) -> None:
    # Submitted when the module started, to a port where nothing ever listens.
    failed = poll(lambda: (s := callback_of(client, doomed))["status"] == "failed" and s,
                  timeout=RETRY_BUDGET + 5, interval=0.2)  # fmt: skip
    assert failed["attempts"] >= 3
    assert "connection to 127.0.0.1 failed" in failed["last_error"]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data/",
     "http://[fd00:ec2::254]/", "http://localhost/hook", "http://10.0.0.7/hook",
     "ftp://example.com/hook",
     # Over the length limit, and empty (schemathesis found the batch's query parameter
     # took both).
     "https://example.com/" + "a" * 2048, ""],
)  # fmt: skip
def test_private_and_metadata_callback_urls_are_refused(url: str) -> None:
    from api import create_app

    app = create_app({"keep_logging": True, "settings": {"callback_allow": ""}})
    resp = app.test_client().post("/v1/predict", json={"input": "hi", "callback_url": url})
    assert resp.status_code == 422, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] in ("callback_url_refused", "validation_error")
    assert error["details"]["errors"][0]["field"] == "callback_url"
    batch = app.test_client().post("/v1/batches?callback_url=" + url, json=[{"custom_id": "a",
                                   "input": "hi"}])  # fmt: skip
    assert batch.status_code == 422 and batch.get_json()["error"]["request_id"]


def test_an_allow_listed_address_passes() -> None:
    from dspy_fleet.webhooks.urls import AllowList, check_url

    allow = AllowList.parse("127.0.0.1/32, hooks.internal")
    assert check_url("http://127.0.0.1:9/hook", allow)[1] == "127.0.0.1"
    assert check_url("https://hooks.internal/x", allow)[1] == "hooks.internal"
    with pytest.raises(Exception, match="cloud metadata"):
        check_url("http://169.254.169.254/", allow)
