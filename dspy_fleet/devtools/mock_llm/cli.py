"""The `mock-llm` command: serve the mock LLM until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import click

from dspy_fleet.devtools.mock_llm.faults import Faults
from dspy_fleet.devtools.mock_llm.server import build_server


@click.command(name="mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option(
    "--port",
    default=8900,
    show_default=True,
    envvar="DSPY_FLEET_MOCK_LLM_PORT",
    type=click.IntRange(0, 65535),
    help="Port to bind; 0 picks a free one.",
)
@click.option("--latency-ms", default=0.0, show_default=True, help="Delay before each answer.")
@click.option("--jitter-ms", default=0.0, show_default=True, help="Uniform ± spread on the delay.")
@click.option("--error-rate", default=0.0, show_default=True, help="Share of requests failing.")
@click.option("--error-every", default=0, show_default=True, help="Fail every Nth request.")
@click.option("--error-status", default=500, show_default=True, help="Status of injected errors.")
@click.option("--retry-after", type=float, default=None, help="Retry-After seconds on 429/503.")
@click.option("--hang-rate", default=0.0, show_default=True, help="Share of requests that hang.")
@click.option("--hang-seconds", default=3600.0, show_default=True, help="How long a hang lasts.")
@click.option(
    "--rpm-limit", default=0, show_default=True, help="Requests/minute per model (0: none)."
)
@click.option(
    "--tpm-limit", default=0, show_default=True, help="Tokens/minute per model (0: none)."
)
@click.option(
    "--limit-burst-seconds",
    default=1.0,
    show_default=True,
    help="Seconds of each rate a burst may use at once (a provider's quantization).",
)
@click.option("--seed", type=int, default=None, help="Seed for repeatable fault injection.")
@click.option("--log-requests", is_flag=True, help="Write one JSON line per request to stderr.")
def command(
    host: str,
    port: int,
    latency_ms: float,
    jitter_ms: float,
    error_rate: float,
    error_every: int,
    error_status: int,
    retry_after: float | None,
    hang_rate: float,
    hang_seconds: float,
    rpm_limit: int,
    tpm_limit: int,
    limit_burst_seconds: float,
    seed: int | None,
    log_requests: bool,
) -> None:
    """Serve an OpenAI-compatible mock LLM that answers DSPy prompts deterministically."""
    try:
        faults = Faults(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            error_rate=error_rate,
            error_every=error_every,
            error_status=error_status,
            retry_after=retry_after,
            hang_rate=hang_rate,
            hang_seconds=hang_seconds,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            limit_burst_seconds=limit_burst_seconds,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        server = build_server(host, port, faults=faults, seed=seed, log_requests=log_requests)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever() returns, and serve_forever() runs in
        # this (main) thread, so it must be called from another thread.
        server.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"mock-llm listening on http://{shown}:{server.server_address[1]}/v1")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
