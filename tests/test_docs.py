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
