"""The README and .env.example stay true to the settings classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.settings import ApiSettings
from dspy_fleet.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = sorted(
    {
        f"DSPY_FLEET_{name.upper()}"
        for cls in (ApiSettings, WorkerSettings)
        for name in cls.model_fields
    }
)


@pytest.mark.parametrize("var", ENV_VARS)
def test_every_setting_is_documented(var: str) -> None:
    env_example = (ROOT / ".env.example").read_text()
    assert re.search(rf"^#? ?{var}=", env_example, re.M), f"{var} missing from .env.example"
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^\| `{var}` \|", readme, re.M), f"{var} missing from README's table"


def test_readme_quick_start_is_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^make \w+$", quick, re.M) == ["make run", "make test"]
    assert (ROOT / ".ci/run").read_text().strip().endswith("make test")


def _make_recipes() -> dict[str, list[str]]:
    """Each Makefile target's recipe lines (tab-indented lines after its rule)."""
    recipes: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif (rule := re.match(r"^([\w. -]+?)\s*:(?!=)", line)) and not line.startswith("\t"):
            current = []
            for target in rule.group(1).split():
                recipes[target] = current
        elif line.strip() and not line.startswith("#"):
            current = None
    return recipes


def test_every_make_command_the_docs_name_runs_something() -> None:
    # `make bench-peer` was documented while its rule only built the peer's venv.
    docs = "".join((ROOT / p).read_text() for p in ("README.md", "bench/README.md"))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", docs))
    recipes = _make_recipes()
    assert named and not named - set(recipes), f"not in the Makefile: {named - set(recipes)}"
    assert not [t for t in named if not recipes[t]], "documented targets without a recipe"
