"""`dspy-fleet submit`: interrupted halfway and rerun, each custom_id ends up exactly once;
failed items make it exit non-zero with a summary that has the total cost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.clients.conftest import Fleet
from tests.conftest import poll

PY = sys.executable
N = 800


def lines_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submit(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "dspy_fleet.cli.main", "submit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )


def test_submit_interrupted_then_resumed_writes_each_custom_id_once(
    running: Fleet, tmp_path: Path
) -> None:
    source = tmp_path / "input.jsonl"
    source.write_text(
        "".join(
            json.dumps({"custom_id": f"row-{i}", "input": f"Resumable question {i}?"}) + "\n"
            for i in range(N)
        )
    )
    out = tmp_path / "results.jsonl"
    args = (str(source), "-o", str(out), "--url", running.api.url, "--poll-interval", "0.1")
    # Slow enough that the run is still going when it is interrupted.
    running.mock.set_faults(latency_ms=300)
    try:
        first = submit(*args)
        poll(
            lambda: first.poll() is not None or len(lines_of(out)) >= N // 8,
            timeout=60,
            interval=0.05,
        )
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=30)
        assert first.returncode == 130, stderr
        assert "rerun the same command to resume" in stderr
        written = len(lines_of(out))
        print(f"\nsubmit: interrupted after {written}/{N} result lines")
        assert 0 < written < N
    finally:
        running.mock.set_faults(latency_ms=0)
    second = submit(*args)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert f"{N}/{N} items" in stdout and "total cost $" in stdout
    rows = lines_of(out)
    per_id = Counter(row["custom_id"] for row in rows)
    assert set(per_id) == {f"row-{i}" for i in range(N)}
    assert set(per_id.values()) == {1}, "a custom_id was written twice"
    assert all(row["status"] == "succeeded" for row in rows)
    # Items submitted by the first run were not computed again by the second.
    assert running.mock.stats()["chat_completions"] == N


def test_submit_direct_reports_failures_and_cost(running: Fleet, tmp_path: Path) -> None:
    source = tmp_path / "input.jsonl"
    rows = [{"custom_id": f"d{i}", "input": f"What is {i}+{i}?"} for i in range(20)]
    rows[3]["program"] = "no-such-program"  # fails in the worker
    rows[5]["parameters"] = {"temperature": 9}  # refused before pushing
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "DSPY_FLEET_REDIS_URL": running.redis_url}
    proc = submit(str(source), "-o", str(out), "--direct", "--poll-interval", "0.1", env=env)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "18 succeeded" in stdout and "3 failed" in stdout and "total cost $" in stdout
    written = lines_of(out)
    assert len(written) == 21
    codes = {r["custom_id"]: r["error"]["code"] for r in written if r["status"] != "succeeded"}
    assert codes == {"d3": "unknown_program", "d5": "validation_error", None: "invalid_item"}
    assert sum(r["cost"]["cost_usd"] for r in written if r["status"] == "succeeded") > 0
