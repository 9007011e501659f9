"""/config masks secrets by structure: a table of the places a secret hides (issue 21, item 4).

The real /config of a running API is checked in tests/test_security.py; these cases pin
the rule itself, one shape per row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.redact import MASK, redact, redact_url, secret_name

URL_CASES = [
    # (url, expected) : userinfo, user-only tokens, secret-looking query and fragment keys
    ("redis://:pw@h:6379/0?password=x", f"redis://{MASK}@h:6379/0?password={MASK}"),
    ("rediss://u:p@h/0?ssl_cert_reqs=none", f"rediss://{MASK}@h/0?ssl_cert_reqs=none"),
    ("https://h/v1?api-key=abc&x=1", f"https://h/v1?api-key={MASK}&x=1"),
    ("amqp://u:p@h//", f"amqp://{MASK}@h//"),
    ("https://ghp_token@github.com/o/r.git", f"https://{MASK}@github.com/o/r.git"),
    ("redis://u:p@ss@h:1/0", f"redis://{MASK}@h:1/0"),  # an unescaped @ in the password
    ("https://h/x?API_KEY=a&Api-Key=b&apikey=c", f"https://h/x?API_KEY={MASK}&Api-Key={MASK}&apikey={MASK}"),
    ("https://h/x?sig=s&se=2030&sp=r", f"https://h/x?sig={MASK}&se=2030&sp=r"),  # an Azure SAS
    ("https://h/x?Signature=s&Expires=1", f"https://h/x?Signature={MASK}&Expires=1"),
    ("https://h/x?X-Amz-Credential=c&X-Amz-Signature=s&X-Amz-Date=d",
     f"https://h/x?X-Amz-Credential={MASK}&X-Amz-Signature={MASK}&X-Amz-Date=d"),
    ("https://h/cb?access_token=t&auth=a&pwd=p&pass=q&secret=s&client_secret=c",
     f"https://h/cb?access_token={MASK}&auth={MASK}&pwd={MASK}&pass={MASK}&secret={MASK}"
     f"&client_secret={MASK}"),
    ("https://h/cb?token=t;key=k", f"https://h/cb?token={MASK};key={MASK}"),
    ("https://h/cb#access_token=t&state=s", f"https://h/cb#access_token={MASK}&state=s"),
    ("https://h/x?api%2Dkey=a", f"https://h/x?api%2Dkey={MASK}"),  # a percent-encoded name
    ("https://h/x?password", "https://h/x?password"),  # no value: nothing to hide
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("https://h/v1?model=gpt&keyspace=1", "https://h/v1?model=gpt&keyspace=1"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "expected"), URL_CASES)
def test_urls_are_masked_by_structure(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    # The same URL anywhere in the config, under any key, inside any text.
    assert redact({"some_setting": url}) == {"some_setting": expected}
    assert redact({"notes": f"use {url} please"}) == {"notes": f"use {expected} please"}


SECRET = "s3cr3t-value"

CONFIG_CASES = [
    # (config, what must stay visible)
    ({"redis_url": f"redis://:{SECRET}@h:6379/0", "broker_url": f"redis://h/0?password={SECRET}",
      "result_backend": f"rediss://u:{SECRET}@h/1", "cache_url": f"redis://x:{SECRET}@c/2"},
     ["h:6379/0", "redis://h/0?password=", "rediss://", "@c/2"]),
    ({"models": {"m": {"api_base": f"https://h/v1?api-key={SECRET}", "api_key_env": "OPENAI_KEY",
                       "lm_kwargs": {"extra_headers": {"X-Weird-Thing": SECRET,
                                                       "Accept": "json"}}}}},
     ["OPENAI_KEY", "X-Weird-Thing", "Accept", "https://h/v1?api-key="]),
    ({"lm_kwargs": {"headers": [["X-Tenant-Blob", SECRET]],
                    "default_headers": [f"X-Odd: {SECRET}"]}},
     ["X-Tenant-Blob", "X-Odd"]),
    ({"lm_kwargs": {"api_key": SECRET, "aws_secret_access_key": SECRET,
                    "vertex_credentials": {"private_key": SECRET}, "temperature": 0.2}},
     ["temperature", "0.2"]),
    ({"webhooks": [{"url": f"https://hooks.example/x?token={SECRET}"},
                   [f"https://u:{SECRET}@cb.example/y", {"nested": [f"amqp://u:{SECRET}@h//"]}]]},
     ["hooks.example/x?token=", "cb.example/y", "@h//"]),
    ({"callback_urls": f"redis://:{SECRET}@a:1/0,redis://:{SECRET}@b:2/0"}, ["@a:1/0", "@b:2/0"]),
    ({"X-Auth-Token": SECRET, "webhookSecret": SECRET, "db_password": SECRET, "authToken": SECRET,
      "ssl_keyfile_password": SECRET, "Cookie": SECRET},
     ["X-Auth-Token", "webhookSecret"]),
    ({"programs": {"qa": {"signature": "question -> answer", "description": "key facts"}}},
     ["question -> answer", "key facts"]),
]  # fmt: skip


@pytest.mark.parametrize(("config", "visible"), CONFIG_CASES)
def test_config_secrets_are_masked_wherever_they_are(
    config: dict[str, Any], visible: list[str]
) -> None:
    text = json.dumps(redact(config))
    assert SECRET not in text
    for shown in visible:
        assert shown in text


@pytest.mark.parametrize(
    ("name", "secret"),
    [("password", True), ("PASS", True), ("pwd", True), ("x-api-key", True), ("api_key", True),
     ("apikey", True), ("ApiKey", True), ("auth", True), ("Authorization", True),
     ("credential", True), ("client_secret", True), ("accessToken", True),
     ("api_key_env", True),  # the name looks secret; redact() spares *_env string values
     ("signature", False), ("ssl_cert_reqs", False), ("keyspace", False), ("author", False),
     ("passthrough", False), ("max_body_bytes", False), ("model", False)],
)  # fmt: skip
def test_secret_names(name: str, secret: bool) -> None:
    assert secret_name(name) is secret
    assert secret_name("sig", in_url=True) and secret_name("Signature", in_url=True)
