"""A `module:` program's version follows its code (issue 16, item 5).

The version is part of every cache key (dspy_fleet/routing.py), so a version that ignored
the module's own code served the old ``forward()``'s cached answers after a deploy. Each
load here is what a worker start does: the user's package imported afresh from disk.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dspy_fleet.fleet_config import ProgramConfig
from worker.programs import code_files, load_program

PROG = """
import dspy

from {pkg} import helpers


class Prog(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return helpers.shape(self.predict(question=question))
"""
HELPERS = """
def shape(prediction):
    return prediction
"""


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Writes a package ``<name>`` under a directory on sys.path; returns a loader that
    imports it afresh from ``root`` and gives the program's version."""
    names: list[str] = []

    def version(root: Path, name: str = "fleetprog") -> str:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        names.append(name)
        try:
            return load_program("p", ProgramConfig(module=f"{name}.prog:Prog")).version
        finally:
            sys.path.remove(str(root))

    yield version
    for name in names:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def write(root: Path, name: str = "fleetprog") -> Path:
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "prog.py").write_text(PROG.format(pkg=name))
    (pkg / "helpers.py").write_text(HELPERS)
    return pkg


def test_same_code_same_version_wherever_it_lives(
    package: Callable[[Path], str], tmp_path: Path
) -> None:
    write(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = package(tmp_path / "a")
    assert package(tmp_path / "a") == first
    assert package(tmp_path / "b") == first  # by content, not by absolute path


def test_changing_forward_changes_the_version(
    package: Callable[[Path], str], tmp_path: Path
) -> None:
    pkg = write(tmp_path)
    before = package(tmp_path)
    prog = pkg / "prog.py"
    prog.write_text(
        prog.read_text()
        .replace("helpers.shape(", "(")
        .replace("import helpers", "import helpers  # noqa")
    )
    assert package(tmp_path) != before


def test_changing_a_helper_module_changes_the_version(
    package: Callable[[Path], str], tmp_path: Path
) -> None:
    pkg = write(tmp_path)
    before = package(tmp_path)
    (pkg / "helpers.py").write_text(HELPERS.replace("return prediction", "return None"))
    assert package(tmp_path) != before
    # A module of the package that nothing has imported yet counts too.
    (pkg / "later.py").write_text("X = 1\n")
    after = package(tmp_path)
    (pkg / "later.py").write_text("X = 2\n")
    assert package(tmp_path) != after


def test_files_that_are_not_code_leave_the_version_alone(
    package: Callable[[Path], str], tmp_path: Path
) -> None:
    pkg = write(tmp_path)
    before = package(tmp_path)
    (pkg / "notes.txt").write_text("not code")
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "stale.py").write_text("X = 3\n")
    assert package(tmp_path) == before


def test_code_files_are_the_programs_package_only(
    package: Callable[[Path], str], tmp_path: Path
) -> None:
    write(tmp_path)
    package(tmp_path)
    module = importlib.import_module("fleetprog.prog").Prog()
    names = [name for name, _ in code_files(module)]
    assert names == ["fleetprog/__init__.py", "fleetprog/helpers.py", "fleetprog/prog.py"]


def test_a_signature_program_has_no_code_files_in_its_version() -> None:
    one = load_program("p", ProgramConfig(signature="question -> answer")).version
    assert load_program("p", ProgramConfig(signature="question -> answer")).version == one
    assert load_program("p", ProgramConfig(signature="question -> reply")).version != one
