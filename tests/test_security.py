"""API keys, tenant isolation, admin view, production refusal, Redis AUTH/TLS, no leaked secrets.

The stack here runs on a password-protected Redis with API keys configured and a
model whose provider key comes from the environment; at the end every log line
and every response body is searched for those secrets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.auth import hash_key, new_key
from dspy_fleet.contract import DEFAULT_TENANT
from dspy_fleet.devtools.redis import RedisServer
from tests.conftest import MockLLM, Service, start_api, start_worker, stop_all, wait_all_ready

REDIS_PASSWORD = f"redis-pw-{uuid.uuid4().hex}"
PROVIDER_KEY = f"sk-provider-{uuid.uuid4().hex}"
KEYS = {"acme": new_key(), "globex": new_key(), "ops": new_key()}
WRONG_KEY = f"dfk_wrong-{uuid.uuid4().hex}"
# Secrets in places /config must find by structure: a URL query and an odd header name.
QUERY_SECRET = f"q-{uuid.uuid4().hex}"
HEADER_SECRET = f"h-{uuid.uuid4().hex}"
SECRETS = [REDIS_PASSWORD, PROVIDER_KEY, WRONG_KEY, QUERY_SECRET, HEADER_SECRET, *KEYS.values()]

CONFIG = """
default_model: mock
models:
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
         api_key_env: TEST_PROVIDER_KEY, input_price_per_1k: 0.001, output_price_per_1k: 0.002}
  odd: {litellm_model: openai/mock-gpt,
        api_base: "${DSPY_FLEET_MOCK_LLM_URL}?api-key=@QUERY@&region=eu",
        lm_kwargs: {extra_headers: {X-Tenant-Blob: "@HEADER@"}}}
programs:
  qa: {signature: "question -> answer"}
""".replace("@QUERY@", QUERY_SECRET).replace("@HEADER@", HEADER_SECRET)


@dataclass
class Secured:
    redis_server: RedisServer
    worker: Service
    api: Service
    responses: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        resp = httpx.request(method, self.api.url + path, headers=headers, timeout=30, **kw)
        self.responses.append(f"{resp.headers}\n{resp.text}")
        return resp


@pytest.fixture(scope="module")
def secured(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("secured")
    (base / "fleet.yaml").write_text(CONFIG)
    entries = [f"acme:{hash_key(KEYS['acme'])}", f"globex:{hash_key(KEYS['globex'])}",
               f"ops:{hash_key(KEYS['ops'])}:admin"]  # fmt: skip
    server = RedisServer(password=REDIS_PASSWORD, log_path=base / "redis.log").start()
    # The cache's Redis password in the query string, which redis-py honours.
    cache_url = f"redis://127.0.0.1:{server.port}/0?password={REDIS_PASSWORD}"
    env = {"DSPY_FLEET_CONFIG": str(base / "fleet.yaml"), "DSPY_FLEET_API_KEYS": ",".join(entries),
           "TEST_PROVIDER_KEY": PROVIDER_KEY, "DSPY_FLEET_CACHE_URL": cache_url}  # fmt: skip
    worker = start_worker(server.url, mock_llm.url, base / "worker.log", wait=False, **env)
    api = start_api(server.url, mock_llm.url, base / "api.log", wait=False, **env)
    wait_all_ready(worker, api)  # started side by side
    yield Secured(server, worker, api)
    stop_all(api, worker)
    server.stop()


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no header"),
        ({"Authorization": f"Bearer {WRONG_KEY}"}, "wrong key"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "wrong scheme"),
        ({"Authorization": "Bearer"}, "empty bearer"),
    ],  # fmt: skip
)
def test_missing_or_wrong_key_is_401(secured: Secured, headers: dict[str, str], why: str) -> None:
    resp = secured.call("POST", "/v1/predict", json={"input": "hi"}, headers=headers)
    assert resp.status_code == 401, why
    error = resp.json()["error"]
    assert error["code"] == "unauthorized" and error["request_id"]
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert secured.call("GET", "/costs", headers=headers).status_code == 401


def test_probes_and_metrics_stay_public(secured: Secured) -> None:
    for path in ("/health", "/ready", "/metrics", "/"):
        assert secured.call("GET", path).status_code == 200, path


def test_tenants_see_only_their_own(secured: Secured) -> None:
    mine = secured.call("POST", "/v1/predict", KEYS["acme"],
                        json={"input": "What is 2+2?", "wait": 20}).json()  # fmt: skip
    assert mine["status"] == "succeeded"
    assert secured.call("GET", f"/v1/predictions/{mine['id']}", KEYS["acme"]).status_code == 200
    other = secured.call("GET", f"/v1/predictions/{mine['id']}", KEYS["globex"])
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert secured.call("GET", f"/v1/predictions/{mine['id']}", KEYS["ops"]).status_code == 200
    # The same request_id from two tenants is two jobs.
    body = {"input": "What is 3+3?", "request_id": "shared-key", "wait": 20}
    a = secured.call("POST", "/v1/predict", KEYS["acme"], json=body).json()
    g = secured.call("POST", "/v1/predict", KEYS["globex"], json=body).json()
    assert a["id"] != g["id"]

    acme_costs = secured.call("GET", "/costs", KEYS["acme"]).json()
    assert set(acme_costs["by_tenant"]) == {"acme"}
    assert acme_costs["totals"]["requests"] == acme_costs["by_tenant"]["acme"]["requests"] >= 2
    admin_costs = secured.call("GET", "/costs", KEYS["ops"]).json()
    assert {"acme", "globex"} <= set(admin_costs["by_tenant"])


def test_config_is_admin_only_and_redacted(secured: Secured) -> None:
    assert secured.call("GET", "/config", KEYS["acme"]).status_code == 403
    body = secured.call("GET", "/config", KEYS["ops"]).json()
    assert body["auth"]["mode"] == "api_keys"
    assert body["auth"]["tenants"] == ["acme", "globex", "ops"]
    assert body["auth"]["admin_tenants"] == ["ops"]
    assert "***" in body["settings"]["redis_url"]
    assert body["fleet"]["models"]["mock"]["api_key_env"] == "TEST_PROVIDER_KEY"
    # Masked by structure: the query's password, an api-key parameter, any header value.
    assert body["settings"]["cache_url"].endswith("/0?password=***")
    odd = body["fleet"]["models"]["odd"]
    assert odd["api_base"].endswith("?api-key=***&region=eu")
    assert odd["lm_kwargs"]["extra_headers"] == {"X-Tenant-Blob": "***"}
    text = json.dumps(body)
    assert all(s not in text for s in SECRETS)
    assert all(hash_key(k) not in text for k in KEYS.values())


def test_password_protected_redis_works(secured: Secured) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=secured.redis_server.port).get("x")
    assert secured.call("GET", "/ready").json()["status"] == "ready"


def test_no_secret_in_logs_responses_or_cache_keys(secured: Secured) -> None:
    secured.call("POST", "/v1/predict", WRONG_KEY, json={"input": "x"})
    secured.call("POST", "/v1/predict", KEYS["acme"], json={"input": "x", "parameters":
                 {"api_key": PROVIDER_KEY}})  # fmt: skip
    secured.call("POST", "/v1/predict", KEYS["acme"], json={"input": "What is 9+1?", "wait": 20})
    client = redis.Redis.from_url(secured.redis_server.url, decode_responses=True)
    cache_keys = list(client.scan_iter("dspy_fleet:cache:*"))
    assert cache_keys
    haystacks = {
        "api log": secured.api.log_path.read_text(),
        "worker log": secured.worker.log_path.read_text(),
        "responses": "\n".join(secured.responses),
        "cache": "\n".join(cache_keys + [client.get(k) or "" for k in cache_keys]),
    }
    for where, text in haystacks.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into the {where}"


def test_open_mode_warns_and_production_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "DSPY_FLEET_ENV": "production", "DSPY_FLEET_API_KEYS": ""}
    proc = subprocess.run([sys.executable, "-m", "dspy_fleet.cli.main", "api"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "DSPY_FLEET_API_KEYS" in proc.stderr and "production" in proc.stderr

    from api import create_app

    app = create_app({"keep_logging": True})
    body = app.test_client().get("/config").get_json()
    assert body["auth"]["mode"] == "open" and "no API keys" in body["auth"]["warning"]


def test_the_anonymous_tenant_cannot_be_given_a_key() -> None:
    # Jobs without a tenant (open mode, direct producers) belong to "anonymous": a key for
    # it would see them all. Refused at start-up, naming the entry but never echoing it.
    entries = f"acme:{hash_key(KEYS['acme'])},{DEFAULT_TENANT}:{hash_key(KEYS['ops'])}:admin"
    env = {**os.environ, "DSPY_FLEET_API_KEYS": entries}
    proc = subprocess.run([sys.executable, "-m", "dspy_fleet.cli.main", "api"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "DSPY_FLEET_API_KEYS: entry 2" in proc.stderr and "'anonymous'" in proc.stderr
    assert "reserved" in proc.stderr and hash_key(KEYS["ops"]) not in proc.stderr
    # Any case: "Anonymous" would read as the same tenant to a person.
    cli = [sys.executable, "-m", "dspy_fleet.cli.main"]
    made = subprocess.run([*cli, "api-key", "new", "--tenant", "Anonymous"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 2 and "reserved" in made.stderr and "key:" not in made.stdout


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is needed for the TLS test")
        pytest.skip("openssl not found")
    names = ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt")
    ca_key, ca, key, csr, cert = (str(tmp_path / n) for n in names)
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=dspy-fleet-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
         "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out",
         cert, "-days", "1", "-extfile", str(ext)],
    ):  # fmt: skip
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


def test_tls_redis_works_end_to_end(mock_llm: MockLLM, tls_files: dict[str, str],
                                    tmp_path: Path) -> None:  # fmt: skip
    server = RedisServer(tls=tls_files, password=REDIS_PASSWORD, log_path=tmp_path / "redis.log")
    try:
        server.start()
    except RuntimeError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("this redis-server was built without TLS")
    assert server.url.startswith("rediss://")
    try:
        worker = start_worker(server.url, mock_llm.url, tmp_path / "worker.log", wait=False)
        api = start_api(server.url, mock_llm.url, tmp_path / "api.log", wait=False)
        wait_all_ready(worker, api)  # started side by side
        try:
            done = httpx.post(api.url + "/v1/predict", json={"input": "What is 1+6?", "wait": 20},
                              timeout=30).json()  # fmt: skip
            assert done["status"] == "succeeded" and done["outputs"]["answer"] == "7"
            assert httpx.get(api.url + "/ready", timeout=10).status_code == 200
        finally:
            stop_all(api, worker)
    finally:
        server.stop()
