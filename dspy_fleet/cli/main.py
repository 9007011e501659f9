"""The `dspy-fleet` command: api, worker, flower, dev, mock-llm.

Heavy imports happen inside each command, so `dspy-fleet api` never loads dspy.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from dspy_fleet import __version__
from dspy_fleet.errors import ConfigError


def _fail(exc: ConfigError) -> NoReturn:
    click.echo(f"dspy-fleet: {exc.message}", err=True)
    sys.exit(2)


def _exec(argv: list[str]) -> NoReturn:
    # exec, not a child: the server becomes this process and receives SIGTERM
    # directly (PID 1 in a container), which is what graceful shutdown needs.
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *argv])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dspy-fleet")
def main() -> None:
    """dspy-fleet: run DSPy programs as a service."""


@main.command()
def api() -> None:
    """Serve the HTTP API under gunicorn (settings from DSPY_FLEET_* variables)."""
    from api.auth import keyring_from
    from api.settings import ApiSettings
    from dspy_fleet.fleet_config import load_fleet_config
    from dspy_fleet.settings import check_redelivery_window, load_settings

    try:
        settings = load_settings(ApiSettings)
        check_redelivery_window(settings, load_fleet_config(settings.config))
        keyring_from(settings)
    except ConfigError as exc:
        _fail(exc)
    _exec(["-m", "gunicorn", "-c", "python:api.gunicorn_conf", "api:create_app()"])


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker; extra arguments go to `celery worker`."""
    from dspy_fleet.fleet_config import load_fleet_config
    from dspy_fleet.settings import WorkerSettings, check_redelivery_window, load_settings

    try:
        settings = load_settings(WorkerSettings)
        check_redelivery_window(settings, load_fleet_config(settings.config))
    except ConfigError as exc:
        _fail(exc)
    # --without-mingle: at start Celery asks every other worker for its revoked task ids and
    # waits a fixed second for the answers; the fleet never revokes (a cancel is a status in
    # the job store that the worker reads), so that second and the broadcast buy nothing.
    _exec([
        "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", settings.pool, "--concurrency", str(settings.concurrency),
        "--queues", ",".join(settings.queue_list), "--task-events", "--without-mingle",
        "--loglevel", settings.log_level, *celery_args,
    ])  # fmt: skip


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--address", default="127.0.0.1", show_default=True, envvar="DSPY_FLEET_FLOWER_ADDRESS"
)
@click.option("--port", default=5555, show_default=True, envvar="DSPY_FLEET_FLOWER_PORT")
@click.option(
    "--basic-auth",
    envvar="DSPY_FLEET_FLOWER_BASIC_AUTH",
    default=None,
    help="user:password[,user2:password2] (env DSPY_FLEET_FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH).",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(address: str, port: int, basic_auth: str | None, flower_args: tuple[str, ...]) -> None:
    """Run Flower (Celery's web monitor) against this fleet's broker; extra args go to Flower."""
    from dspy_fleet.settings import CommonSettings, load_settings

    try:
        settings = load_settings(CommonSettings)
    except ConfigError as exc:
        _fail(exc)
    if basic_auth:
        # Through the environment, not argv: `ps` shows argv to every user.
        os.environ["FLOWER_BASIC_AUTH"] = basic_auth
    if not os.environ.get("FLOWER_BASIC_AUTH") and not os.environ.get("FLOWER_AUTH"):
        if settings.env == "production":
            _fail(ConfigError("flower: production needs --basic-auth (or FLOWER_AUTH)"))
        click.echo("dspy-fleet: Flower runs WITHOUT authentication (local mode)", err=True)
    _exec([
        "-m", "celery", "-A", "worker.celery_app", "flower",
        f"--address={address}", f"--port={port}", *flower_args,
    ])  # fmt: skip


@main.command()
@click.option("--api-port", default=8080, show_default=True, help="Port of the HTTP API.")
@click.option("--mock-port", default=8900, show_default=True, help="Port of the mock LLM.")
@click.option("--metrics-port", default=9101, show_default=True, help="Worker metrics port.")
@click.option("--redis-url", default=None, help="Use this Redis instead of starting one.")
def dev(api_port: int, mock_port: int, metrics_port: int, redis_url: str | None) -> None:
    """Run the whole stack locally: Redis, mock LLM, a worker and the API. Ctrl-C stops it."""
    from dspy_fleet.devtools.dev import run_dev_stack

    sys.exit(
        run_dev_stack(
            api_port=api_port, mock_port=mock_port, metrics_port=metrics_port, redis_url=redis_url
        )
    )


@main.group("api-key")
def api_key() -> None:
    """Make API keys for DSPY_FLEET_API_KEYS (only their hashes are stored)."""


@api_key.command("new")
@click.option("--tenant", required=True, help="Tenant the key belongs to ([A-Za-z0-9_.:-]).")
@click.option("--admin", is_flag=True, help="An admin key sees every tenant's data.")
def api_key_new(tenant: str, admin: bool) -> None:
    """Print a new random key (give it to the client) and its DSPY_FLEET_API_KEYS entry."""
    from api.auth import hash_key, new_key, parse_keys

    key = new_key()
    entry = f"{tenant}:{hash_key(key)}" + (":admin" if admin else "")
    try:
        parse_keys(entry)
    except ConfigError as exc:
        _fail(exc)
    click.echo(f"key:   {key}")
    click.echo(f"entry: {entry}")


@api_key.command("hash")
@click.argument("key")
def api_key_hash(key: str) -> None:
    """Print the SHA-256 of an existing key, as DSPY_FLEET_API_KEYS stores it."""
    from api.auth import hash_key

    click.echo(hash_key(key))


def _register_mock_llm() -> None:
    from dspy_fleet.devtools.mock_llm.cli import command

    main.add_command(command, "mock-llm")


_register_mock_llm()


def _register_submit() -> None:
    from dspy_fleet.cli.submit import command

    main.add_command(command, "submit")


_register_submit()


def _register_loop() -> None:
    from dspy_fleet.cli.loop import feedback, report

    main.add_command(feedback, "feedback")
    main.add_command(report, "report")
    from dspy_fleet.cli.examples import examples, traces

    main.add_command(examples, "examples")
    main.add_command(traces, "traces")


_register_loop()

if __name__ == "__main__":
    main()
