"""``python -m bench.peer [--quick|--smoke]``: ours beside the LiteLLM proxy, in one run.

Both call the same stub LLM (the project's mock at 200 ms) over HTTP: the proxy as an
OpenAI-compatible gateway (``POST /v1/chat/completions``, one uvicorn worker, from its own
venv ``.venv-peer`` that ``make bench-peer`` installs), ours as a gateway's client sees it
(``POST /v1/predict`` with ``wait``, ``use_cache: false``, default engine and gunicorn
settings, one worker process). The sides take turns, the order alternating each round, and
every figure is printed beside the proxy's as ``name: value (baseline: value, ratio: r,
target: t)``, the targets being issue 18's:

- added latency p50 / p99 at a steady 50 req/s (open loop), minus the stub's 200 ms;
- CPU milliseconds per request over that steady phase (``/proc``: every process of the side,
  our API's gunicorn master and workers plus our worker; the proxy's process tree);
- throughput with 64 requests in flight (wrk, closed loop, distinct inputs);
- peak RSS (``VmHWM``): our largest API worker plus our worker, against the proxy's processes.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.load import WRK, paced, percentile
from bench.report import Figure, median, parse_mode, print_report, spread
from bench.stack import CONFIG as BENCH_CONFIG
from bench.stack import peak_rss_mb
from dspy_fleet.devtools.procs import child_pids, free_port
from dspy_fleet.devtools.services import Service
from dspy_fleet.devtools.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
UPSTREAM_MS = 200  # issue 18: "a 200 ms upstream"
RATE = 50.0  # issue 18: "a steady 50 req/s"
IN_FLIGHT = 64  # issue 18: "concurrency 64"
TICKS = os.sysconf("SC_CLK_TCK")

# The bench's own models file without its engine pin and its failing model: ours runs on the
# defaults a user gets.
OURS_CONFIG = (
    "\n".join(
        line for line in BENCH_CONFIG.split("  fragile:")[0].splitlines() if "engine" not in line
    )
    + '\nprograms:\n  qa: {signature: "question -> answer"}\n'
)

PEER_CONFIG = """
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/mock-gpt
      api_base: {mock_url}
      api_key: sk-bench
litellm_settings:
  telemetry: false
"""

# wrk sends distinct bodies (no side may answer from a cache or coalesce requests).
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{body}', counter, math.random(1000000000))
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json"}}, body)
end
"""
BODIES = {
    "ours": '{"input": "peer %d-%d", "wait": 60, "use_cache": false}',
    "peer": '{"model": "mock-gpt", "messages": [{"role": "user", "content": "peer %d-%d"}]}',
}
PATHS = {"ours": "/v1/predict", "peer": "/v1/chat/completions"}


@dataclass(frozen=True)
class Sizes:
    """How long each measurement runs."""

    rounds: int
    latency_requests: int
    throughput_seconds: int


MODES = {
    "smoke": Sizes(rounds=1, latency_requests=50, throughput_seconds=3),
    "quick": Sizes(rounds=1, latency_requests=300, throughput_seconds=8),
    "full": Sizes(rounds=3, latency_requests=1000, throughput_seconds=15),
}


def say(text: str) -> None:
    """Progress, on stderr."""
    print(f"bench-peer: {text}", file=sys.stderr, flush=True)


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of processes and their direct children."""
    total = 0.0
    for pid in pids:
        for p in (pid, *child_pids(pid)):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended while we looked
                continue
            total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (proc(5))
    return total


def ok_call(side: str, url: str, tag: str) -> Callable[[httpx.Client, int], bool]:
    """One request of a side; True when it got a model's answer."""

    def ours(client: httpx.Client, i: int) -> bool:
        body = {"input": f"peer {tag} {i}", "wait": 60, "use_cache": False}
        resp = client.post(url + PATHS["ours"], json=body)
        return resp.status_code == 200 and resp.json().get("status") == "succeeded"

    def peer(client: httpx.Client, i: int) -> bool:
        body = {"model": "mock-gpt", "messages": [{"role": "user", "content": f"peer {tag} {i}"}]}
        resp = client.post(url + PATHS["peer"], json=body)
        return resp.status_code == 200 and bool(resp.json().get("choices"))

    return ours if side == "ours" else peer


def wrk_rate(side: str, url: str, seconds: int) -> tuple[float, int]:
    """Requests/s with ``IN_FLIGHT`` connections, and how many were not 2xx or failed."""
    if not WRK:
        raise RuntimeError(
            "bench-peer needs wrk (Debian package wrk; `make bench-peer` installs it)"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(body=BODIES[side]))
    try:
        out = subprocess.run(
            [WRK, "-t2", f"-c{IN_FLIGHT}", f"-d{seconds}s", "--timeout", "30s", "-s",
             script.name, url + PATHS[side]],
            capture_output=True, text=True, timeout=seconds + 90, check=True,
        ).stdout  # fmt: skip
    finally:
        Path(script.name).unlink()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return rate, (int(bad.group(1)) if bad else 0) + (
        sum(map(int, errors.groups())) if errors else 0
    )


class PeerRun:
    """Everything one run starts: Redis, the stub, our API and worker, the proxy."""

    def __init__(self) -> None:
        if not PEER_PYTHON.exists():
            raise SystemExit(f"{PEER_PYTHON} missing: run `make bench-peer` (it installs "
                             "litellm[proxy] into .venv-peer)")  # fmt: skip
        self.workdir = Path(tempfile.mkdtemp(prefix="dspy-fleet-bench-peer-"))
        (self.workdir / "fleet.yaml").write_text(OURS_CONFIG)
        config = str(self.workdir / "fleet.yaml")
        self.stack = Stack(self.workdir, env={"DSPY_FLEET_CONFIG": config}, cwd=ROOT)
        self.urls: dict[str, str] = {}
        self.pids: dict[str, list[int]] = {}

    def start(self) -> None:
        """All services, ready, the stub at 200 ms."""
        self.stack.start_redis()
        mock = self.stack.start_mock_llm()
        mock.set_faults(latency_ms=UPSTREAM_MS)
        worker = self.stack.start_worker("ours-worker")
        api = self.stack.start_api("ours-api")
        self.urls["ours"] = api.url
        self.pids["ours"] = [api.pid, worker.pid]
        self.pids["ours-api"] = [api.pid]
        self.pids["ours-worker"] = [worker.pid]
        (self.workdir / "peer.yaml").write_text(PEER_CONFIG.format(mock_url=mock.url))
        port = free_port()
        # No auth on either side (ours runs without API keys here); the proxy refuses to
        # start without a master key unless told this is a local run.
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
               "PATH": os.environ.get("PATH", ""), "HOME": str(self.workdir)}  # fmt: skip
        proxy: Service = self.stack.start_process(
            "litellm-proxy",
            [str(PEER_PYTHON), "-m", "litellm.proxy.proxy_cli", "--config",
             str(self.workdir / "peer.yaml"), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            url=f"http://127.0.0.1:{port}", health_path="/health/liveliness", env=env,
            timeout=180,
        )  # fmt: skip
        self.urls["peer"] = proxy.url
        self.pids["peer"] = [proxy.pid]

    def warm_up(self) -> None:
        """Imports done, clients built, pools filled: 64 requests each."""
        for side in ("ours", "peer"):
            _, failed = paced(ok_call(side, self.urls[side], "warm"), rate=RATE, count=64,
                              timeout=60)  # fmt: skip
            if failed:
                raise RuntimeError(f"{side}: {failed} of 64 warm-up requests failed "
                                   f"(logs in {self.workdir})")  # fmt: skip

    def stop(self) -> None:
        """Everything this run started."""
        self.stack.stop()


def run(mode: str) -> list[Figure]:
    """Start, measure in alternating rounds, stop."""
    sizes = MODES[mode]
    peer_run = PeerRun()
    try:
        peer_run.start()
        say(f"mode {mode}; services up; logs in {peer_run.workdir}")
        peer_run.warm_up()
        keys = ("p50", "p99", "cpu", "rate")
        got: dict[str, dict[str, list[float]]] = {
            s: {k: [] for k in keys} for s in ("ours", "peer")
        }
        for r in range(sizes.rounds):
            for side in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                url, tag = peer_run.urls[side], uuid.uuid4().hex[:8]
                cpu0 = tree_cpu(peer_run.pids[side])
                lat, failed = paced(ok_call(side, url, tag), rate=RATE,
                                    count=sizes.latency_requests, timeout=60)  # fmt: skip
                cpu1 = tree_cpu(peer_run.pids[side])
                if failed:
                    raise RuntimeError(f"{side}: {failed} paced requests failed")
                added = [ms - UPSTREAM_MS for ms in lat]
                got[side]["p50"].append(percentile(added, 50))
                got[side]["p99"].append(percentile(added, 99))
                got[side]["cpu"].append(1000 * (cpu1 - cpu0) / sizes.latency_requests)
                rate, bad = wrk_rate(side, url, sizes.throughput_seconds)
                if bad:
                    raise RuntimeError(f"{side}: {bad} requests failed under {IN_FLIGHT} in flight")
                got[side]["rate"].append(rate)
                say(f"round {r} {side}: added p50 {got[side]['p50'][-1]:.1f} ms, p99 "
                    f"{got[side]['p99'][-1]:.1f} ms, CPU {got[side]['cpu'][-1]:.2f} ms/req, "
                    f"{rate:.0f} req/s at {IN_FLIGHT} in flight")  # fmt: skip
                time.sleep(1)  # the last wrk requests drain before the other side starts
        return figures(peer_run, got)
    finally:
        peer_run.stop()


def figures(peer_run: PeerRun, got: dict[str, dict[str, list[float]]]) -> list[Figure]:
    """The medians, against issue 18's targets."""

    def med(side: str, key: str) -> float:
        return median(got[side][key])

    api_workers = child_pids(peer_run.pids["ours-api"][0]) or peer_run.pids["ours-api"]
    ours_rss = max(peak_rss_mb(p) for p in api_workers) + peak_rss_mb(
        peer_run.pids["ours-worker"][0]
    )
    proxy_pid = peer_run.pids["peer"][0]
    peer_rss = sum(peak_rss_mb(p) for p in (proxy_pid, *child_pids(proxy_pid)))
    base = "ms LiteLLM proxy"
    p50, p99, cpu, rate = (
        med("ours", "p50"),
        med("ours", "p99"),
        med("ours", "cpu"),
        med("ours", "rate"),
    )
    p50_peer, p99_peer = med("peer", "p50"), med("peer", "p99")
    cpu_peer, rate_peer = med("peer", "cpu"), med("peer", "rate")

    def notes(key: str) -> list[str]:
        return [spread("ours", got["ours"][key]), spread("proxy", got["peer"][key])]

    return [
        Figure("peer_added_latency_p50", p50, "ms", p50_peer, base, "ratio <= 0.5",
               p50 <= 0.5 * p50_peer, notes("p50")),
        Figure("peer_added_latency_p99", p99, "ms", p99_peer, base, "ratio <= 1",
               p99 <= p99_peer, notes("p99")),
        Figure("peer_cpu_ms_per_request", cpu, "ms API + worker", cpu_peer, base,
               "ratio <= 0.5", cpu <= 0.5 * cpu_peer,
               [f"over the {RATE:.0f} req/s phase; every process of each side", *notes("cpu")]),
        Figure("peer_throughput_c64", rate, "req/s", rate_peer, "req/s LiteLLM proxy",
               "ratio >= 2", rate >= 2 * rate_peer, notes("rate")),
        Figure("peer_peak_rss", ours_rss, "MB API worker + worker", peer_rss, "MB LiteLLM proxy",
               "ratio <= 0.75", ours_rss <= 0.75 * peer_rss, []),
    ]  # fmt: skip


def versions() -> str:
    """What was measured: the machine, Python, and the proxy's LiteLLM version."""
    peer = subprocess.run([str(PEER_PYTHON), "-c", "import importlib.metadata as m; "
                           "print(m.version('litellm'))"],
                          capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    load = os.getloadavg()
    return (
        f"cpus: {os.cpu_count()} ({platform.machine()}), load average at start: "
        f"{load[0]:.2f}; python {platform.python_version()}; litellm proxy {peer or '?'}"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the mode, run, print."""
    mode = parse_mode("python -m bench.peer", __doc__, argv)
    header = versions()
    started = time.monotonic()
    figures = run(mode)
    print_report(figures, f"mode: {mode}, {time.monotonic() - started:.0f} s; {header}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
