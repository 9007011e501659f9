"""The API process stays small: building the app never imports dspy or litellm."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from api import create_app
app = create_app()
client = app.test_client()
client.get('/health')
client.post('/v1/predict', json={'input': 5})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('dspy', 'litellm', 'openai'))
print(json.dumps(heavy))
"""


def test_api_never_imports_dspy_or_litellm() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={"DSPY_FLEET_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_probe_would_notice_an_import() -> None:
    # The same probe, forcing the import, must report it: the check above can fail.
    proc = subprocess.run(
        [sys.executable, "-c", "import worker.dspy_env\n" + PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "DSPY_FLEET_REDIS_URL": "redis://127.0.0.1:1/0",
            "PATH": "/usr/bin:/bin",
            "DSPY_CACHEDIR": "/tmp/dspy-probe",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "dspy" in json.loads(proc.stdout.strip().splitlines()[-1])
