"""``python -m bench.profile``: where the CPU of one prediction goes, API and worker apart.

Starts Redis, the mock LLM (0 ms), our worker and our API with the default engine, warms them
up, then sends ``--jobs`` predictions (``wait``, cache off) from 16 clients while py-spy samples
the worker and the API's gunicorn workers (``--gil``: only the thread holding the GIL, so
samples follow the CPU of these GIL-bound processes). It prints CPU milliseconds per
prediction for each process (``/proc``) and splits it by component, from the sampled stacks:
each sample goes to the innermost frame that belongs to a known component (Redis client,
provider HTTP, DSPy, Celery and kombu, logging, metrics, our code), so ``socket.recv`` under
redis-py counts as Redis and under httpx as HTTP. Needs py-spy (``make bench-profile``
installs it into .venv).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.load import paced
from bench.peer import OURS_CONFIG, tree_cpu
from dspy_fleet.devtools.procs import child_pids
from dspy_fleet.devtools.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 16
SAMPLE_HZ = 200

# (component, path fragments): the first component, from the innermost frame outwards, whose
# fragment starts a frame's file path (as py-spy prints it) names the sample. Order matters
# within a frame only.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("Redis client (redis-py)", ("redis/",)),
    ("provider HTTP (httpx/httpcore)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("LiteLLM", ("litellm/",)),
    ("DSPy adapter", ("dspy/adapters/", "dspy/signatures/")),
    ("DSPy LM client", ("dspy/clients/",)),
    ("DSPy other", ("dspy/",)),
    ("JSON", ("json/", "orjson", "ujson")),
    ("logging", ("logging/", "pythonjsonlogger")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("pydantic", ("pydantic/", "pydantic_core")),
    ("Celery and kombu", ("celery/", "kombu/", "billiard/", "vine/")),
    ("Flask, Werkzeug, gunicorn, gevent", ("flask/", "werkzeug/", "gunicorn/", "gevent/")),
    ("ours (api/, worker/, dspy_fleet/)", ("api/", "worker/", "dspy_fleet/")),
]
CALLERS = {"Celery and kombu": "kombu/Celery", "ours (api/, worker/, dspy_fleet/)": "ours"}


def component(frames: list[str]) -> str:
    """The component a stack (outermost first) is charged to; Redis split by its caller."""
    for i in range(len(frames) - 1, -1, -1):
        for name, fragments in COMPONENTS:
            if _in(frames[i], fragments):
                if name.startswith("Redis"):
                    return f"{name}, called by {_caller(frames[:i])}"
                return name
    return "other (interpreter, threads, stdlib)"


def _in(frame: str, fragments: tuple[str, ...]) -> bool:
    """Whether a frame (``func (path/file.py:line)``, path relative to sys.path) is in one."""
    where = frame.rpartition("(")[2]
    return any(where.startswith(f) or "/" + f in where for f in fragments)


def _caller(frames: list[str]) -> str:
    for i in range(len(frames) - 1, -1, -1):
        for name, fragments in COMPONENTS:
            if name in CALLERS and _in(frames[i], fragments):
                return CALLERS[name]
    return "other"


def breakdown(raw: Path) -> Counter[str]:
    """Samples per component from py-spy's ``--format raw`` output (collapsed stacks)."""
    counts: Counter[str] = Counter()
    if not raw.exists():
        return counts
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[component(stack.split(";"))] += int(n)
    return counts


def send(url: str, jobs: int, rate: float | None = None) -> int:
    """``jobs`` predictions with ``wait``, cache off, from ``CLIENTS`` threads (closed loop)
    or, with ``rate``, started at that steady rate per second (open loop, as bench.peer's
    latency phase); failures."""
    tag = uuid.uuid4().hex[:8]

    def one(http: httpx.Client, i: int) -> bool:
        body = {"input": f"profile {tag} {i}", "wait": 60, "use_cache": False}
        resp = http.post(url + "/v1/predict", json=body)
        return resp.status_code == 200 and resp.json().get("status") == "succeeded"

    if rate is not None:
        return paced(one, rate=rate, count=jobs, timeout=60)[1]
    limits = httpx.Limits(max_connections=CLIENTS)
    with httpx.Client(timeout=60, limits=limits) as http, ThreadPoolExecutor(CLIENTS) as pool:
        return sum(not ok for ok in pool.map(lambda i: one(http, i), range(jobs)))


def main(argv: list[str] | None = None) -> int:
    """Start, warm up, profile, print."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="start predictions at this steady rate per second (open loop; "
        "bench.peer measures CPU at 50) instead of 16 closed-loop clients",
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy not found: `make bench-profile` installs it into .venv")
    workdir = Path(tempfile.mkdtemp(prefix="dspy-fleet-bench-profile-"))
    (workdir / "fleet.yaml").write_text(OURS_CONFIG)
    stack = Stack(workdir, env={"DSPY_FLEET_CONFIG": str(workdir / "fleet.yaml")}, cwd=ROOT)
    try:
        stack.start_redis()
        stack.start_mock_llm().set_faults(latency_ms=0)
        worker, api = stack.start_worker("worker"), stack.start_api("api")
        if send(api.url, 64):
            raise RuntimeError(f"warm-up predictions failed (logs in {workdir})")
        targets = {"worker": [worker.pid], "api": child_pids(api.pid)}
        spies = [
            subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(SAMPLE_HZ),
                              "--format", "raw", "--output", str(workdir / f"{name}-{pid}.txt"),
                              "--nonblocking", "--gil"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pids in targets.items() for pid in pids
        ]  # fmt: skip
        time.sleep(1.0)  # py-spy attached
        cpu0 = {name: tree_cpu(pids) for name, pids in targets.items()}
        started = time.monotonic()
        failed = send(api.url, args.jobs, args.rate)
        elapsed = time.monotonic() - started
        cpu1 = {name: tree_cpu(pids) for name, pids in targets.items()}
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for spy in spies:
            spy.wait(30)
    finally:
        stack.stop()
    load = f"{args.rate:g}/s open loop" if args.rate else f"{CLIENTS} clients"
    print(f"# {args.jobs} predictions ({load}) in {elapsed:.1f} s ({args.jobs / elapsed:.0f}/s), "
          f"{failed} failed; mock at 0 ms; default engine; logs in {workdir}")  # fmt: skip
    for name in targets:
        ms = 1000 * (cpu1[name] - cpu0[name]) / args.jobs
        counts: Counter[str] = Counter()
        for raw in workdir.glob(f"{name}-*.txt"):
            counts += breakdown(raw)
        total = sum(counts.values()) or 1
        print(f"{name}: {ms:.2f} CPU ms per prediction ({total} samples)")
        for comp, n in counts.most_common():
            print(f"  {100 * n / total:5.1f} %  {ms * n / total:6.2f} ms  {comp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
