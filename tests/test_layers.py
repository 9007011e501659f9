"""The layout tells the truth: layers import downward only, and the SDK is light.

``dspy_fleet`` (the shared core) knows neither Flask nor DSPy; ``api/`` (Flask) and
``worker/`` (Celery + DSPy) stand on it and never on each other. The checks read
the import statements of every module, so they hold for code paths no test runs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dspy_fleet", "api", "worker")
# What the shared core may never import at module level.
CORE_FORBIDDEN = {"api", "worker", "flask", "werkzeug", "gunicorn", "dspy", "litellm"}
# The command line starts the processes, so it reaches for them, but only inside the
# command that needs them: importing the CLI loads neither process.
LAZY_ONLY = ("dspy_fleet/cli/",)
HEAVY = ("celery", "kombu", "redis", "dspy", "litellm", "flask")


def imports_of(path: Path, *, top_level_only: bool) -> set[str]:
    """The top-level package names ``path`` imports (module level only, if asked)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.If | ast.Try) and top_level_only:
            # `try: import x` and `if TYPE_CHECKING:` blocks at module level count too.
            found.update(imports_of_nodes(node))
    return found


def imports_of_nodes(node: ast.AST) -> set[str]:
    """Every top-level package named by an import statement anywhere under ``node``."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names.update(alias.name.split(".")[0] for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
            names.add(sub.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    """Every Python file of one of our packages."""
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_has_modules() -> None:
    # Guards the checks below against passing on an empty or mistyped package list.
    assert all(len(modules(p)) >= 5 for p in PACKAGES)


@pytest.mark.parametrize(("package", "other"), [("api", "worker"), ("worker", "api")])
def test_the_processes_never_import_each_other(package: str, other: str) -> None:
    offenders = {
        str(path.relative_to(ROOT))
        for path in modules(package)
        if other in imports_of(path, top_level_only=False)
    }
    assert offenders == set()


def test_the_core_imports_neither_process_nor_flask_nor_dspy() -> None:
    offenders = {}
    for path in modules("dspy_fleet"):
        rel = path.relative_to(ROOT).as_posix()
        lazy_ok = rel.startswith(LAZY_ONLY)
        bad = imports_of(path, top_level_only=lazy_ok) & CORE_FORBIDDEN
        if bad:
            offenders[rel] = sorted(bad)
    assert offenders == {}


def test_the_import_reader_sees_nested_and_module_level_imports(tmp_path: Path) -> None:
    # The reader must be able to fail: a nested and a guarded import are both seen.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\ntry:\n    import flask\nexcept ImportError:\n    pass\n"
        "def f():\n    from worker.tasks import predict\n"
    )
    assert imports_of(probe, top_level_only=True) == {"os", "flask"}
    assert imports_of(probe, top_level_only=False) == {"os", "flask", "worker"}


def _loaded_after(statement: str) -> list[str]:
    probe = (
        f"{statement}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_the_sdk_loads_no_server_library() -> None:
    # The issue's own probe: the published client needs httpx and pydantic only.
    assert _loaded_after("import dspy_fleet.client") == []


def test_the_sdk_probe_would_notice_a_server_library() -> None:
    assert "redis" in _loaded_after("import dspy_fleet.client, dspy_fleet.store.jobs")
