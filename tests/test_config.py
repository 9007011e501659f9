"""Invalid configuration stops start-up with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspy_fleet.errors import ConfigError
from dspy_fleet.fleet_config import load_fleet_config
from dspy_fleet.settings import DEFAULT_CONFIG_FILE, WorkerSettings, load_settings

GOOD = """
default_model: m
models:
  m: {litellm_model: openai/x, api_base: "${TEST_BASE:-http://h/v1}"}
programs:
  qa: {signature: "question -> answer"}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_default_config_loads() -> None:
    cfg = load_fleet_config(DEFAULT_CONFIG_FILE)
    assert cfg.default_program == "qa" and "mock" in cfg.models


def test_env_references_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, GOOD)
    assert load_fleet_config(path).models["m"].api_base == "http://h/v1"
    monkeypatch.setenv("TEST_BASE", "http://elsewhere/v1")
    assert load_fleet_config(path).models["m"].api_base == "http://elsewhere/v1"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("default_model: m", "default_model: zz"), "default_model"),
        (("litellm_model: openai/x", "litellm_model: openai/x, timeout: -1"), "models.m.timeout"),
        (
            ("litellm_model: openai/x", "litellm_model: openai/x, fallbacks: [nope]"),
            "models.m.fallbacks",
        ),
        (('{signature: "question -> answer"}', "{}"), "programs.qa"),
        (
            ('{signature: "question -> answer"}', '{signature: "q -> a", colour: red}'),
            "programs.qa.colour",
        ),
        (
            ('{signature: "question -> answer"}', '{signature: "q -> a", model: nope}'),
            "programs.qa.model",
        ),
        (("programs:", "programz:"), "programz"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[1][:30],
)
def test_invalid_fleet_config_names_the_key(
    tmp_path: Path, change: tuple[str, str], named: str
) -> None:
    path = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_fleet_config(path)
    assert named in info.value.message


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DSPY_FLEET_CONFIG"):
        load_fleet_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_fleet_config(_write(tmp_path, "a: [b"))


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DSPY_FLEET_CONCURRENCY": "lots"}, "DSPY_FLEET_CONCURRENCY"),
        ({"DSPY_FLEET_POOL": "fibers"}, "DSPY_FLEET_POOL"),
        ({"DSPY_FLEET_ENV": "staging"}, "DSPY_FLEET_ENV"),
        ({"DSPY_FLEET_SOFT_TIME_LIMIT": "200"}, "time_limit"),
    ],
)
def test_invalid_env_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(WorkerSettings)
    assert named in info.value.message


def test_visibility_timeout_is_above_the_hard_limit() -> None:
    settings = WorkerSettings()
    assert settings.visibility_timeout > settings.time_limit > settings.soft_time_limit


@pytest.mark.parametrize("command", ["worker", "api"])
def test_cli_refuses_to_start_with_bad_config(command: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DSPY_FLEET_CONFIG": str(_write(tmp_path, "default_model: [1")),
        "DSPY_FLEET_CONCURRENCY": "8",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dspy_fleet.cli.main", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "DSPY_FLEET_CONFIG" in proc.stderr
    bad_env = {**os.environ, "DSPY_FLEET_MAX_BODY_BYTES": "tiny", "DSPY_FLEET_CONCURRENCY": "x"}
    proc = subprocess.run(
        [sys.executable, "-m", "dspy_fleet.cli.main", command],
        env=bad_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    expected = "DSPY_FLEET_CONCURRENCY" if command == "worker" else "DSPY_FLEET_MAX_BODY_BYTES"
    assert expected in proc.stderr
