"""Dockerfile.api and Dockerfile.worker: hadolint-clean, non-root, healthy; API image small."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import pytest

from tests.deploy.conftest import ROOT, tool

DOCKERFILES = {"api": ROOT / "Dockerfile.api", "worker": ROOT / "Dockerfile.worker"}


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def runtime_stage(path: str) -> list[tuple[str, str]]:
    """The instructions of the last stage (what the image runs with)."""
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_is_clean(name: str) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_runs_for_real(tmp_path) -> None:
    """Control: hadolint fails an unpinned, root-running Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python app.py\n")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize(("name", "port"), [("api", "8080"), ("worker", "9101")])
def test_image_runtime_is_non_root_healthy_and_stops_gracefully(name: str, port: str) -> None:
    ins = instructions(f"Dockerfile.{name}")
    assert sum(word == "FROM" for word, _ in ins) >= 2, "multi-stage"
    assert all("slim" in arg or arg.startswith("${") for word, arg in ins if word == "FROM")
    assert any(
        re.match(r"ARG PYTHON_IMAGE=python:3\.11-slim", f"ARG {a}") for w, a in ins if w == "ARG"
    )
    stage = runtime_stage(f"Dockerfile.{name}")
    words = dict(stage)
    assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", words["USER"]), "numeric non-root uid:gid"
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert words["CMD"] == f'["dspy-fleet", "{name}"]', "exec form, so dspy-fleet execs as PID 1"
    health = words["HEALTHCHECK"]
    assert 'CMD ["python", "-c"' in health and "urllib.request" in health and "/health" in health
    assert f"'{port}'" in health
    assert words["EXPOSE"] == port
    # The server behind EXPOSE must listen beyond loopback (both default to 127.0.0.1).
    host_var = {"api": "DSPY_FLEET_API_HOST", "worker": "DSPY_FLEET_METRICS_HOST"}[name]
    envs = " ".join(arg for word, arg in stage if word == "ENV")
    assert f"{host_var}=0.0.0.0" in envs
    # The runtime stage copies only the built venv, never the build context.
    copies = [arg for word, arg in stage if word in ("COPY", "ADD")]
    assert copies == ["--from=build /opt/venv /opt/venv"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secrets_are_baked_in(name: str) -> None:
    for word, arg in instructions(f"Dockerfile.{name}"):
        if word in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", arg, re.I), arg


def test_api_image_installs_no_dspy_or_litellm() -> None:
    (install,) = [a for w, a in instructions("Dockerfile.api") if w == "RUN" and "pip install" in a]
    extras = re.findall(r'"\./\[([a-z,]+)\]"', install)
    assert extras == ["api"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = project["dependencies"] + project["optional-dependencies"]["api"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in installed}
    assert not names & {"dspy", "dspy-ai", "litellm", "dspy-fleet"}, names
    (worker_install,) = [
        a for w, a in instructions("Dockerfile.worker") if w == "RUN" and "pip install" in a
    ]
    assert re.findall(r'"\./\[([a-z,]+)\]"', worker_install) == ["worker"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").replace("**/", "")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts))) or any(
            fnmatch.fnmatch(p, pat) for p in parts
        ):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in (
        ".env",
        ".env.production",
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
    ):
        assert dockerignored(secret, patterns), secret
    for name in DOCKERFILES:
        for word, arg in instructions(f"Dockerfile.{name}"):
            if word == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    assert (ROOT / src).exists(), src
                    assert not dockerignored(src, patterns), f"{src} is excluded from the context"
                    assert not dockerignored(
                        f"{src}/__init__.py" if (ROOT / src).is_dir() else src, patterns
                    )
