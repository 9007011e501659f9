"""`dspy-fleet feedback` and `dspy-fleet report`: close the loop from a shell, through the API.

Both call the HTTP API with the SDK (dspy_fleet/client.py); nothing here needs Redis or DSPy.
"""

from __future__ import annotations

import json
from typing import Any

import click

from dspy_fleet.errors import ClientError

URL = click.option(
    "--url",
    default="http://127.0.0.1:8080",
    envvar="DSPY_FLEET_API_URL",
    show_default=True,
    help="The API (env DSPY_FLEET_API_URL).",
)
API_KEY = click.option(
    "--api-key",
    envvar="DSPY_FLEET_API_KEY",
    default=None,
    help="Bearer key for the API (env DSPY_FLEET_API_KEY).",
)


def _client(url: str, api_key: str | None) -> Any:
    from dspy_fleet.client import FleetClient

    return FleetClient(url, api_key=api_key)


def _fail(exc: ClientError) -> None:
    raise click.ClickException(f"{exc.code}: {exc.message}")


@click.command("feedback")
@click.argument("prediction_id")
@click.argument("score", type=float)
@click.option("--source", default=None, help="Who judges (default 'default'); one per source.")
@click.option("--label", default=None, help="A label, e.g. good / wrong.")
@click.option("--comment", default=None, help="Free text.")
@click.option("--expected", default=None, help="The expected output fields, as a JSON object.")
@URL
@API_KEY
def feedback(prediction_id: str, score: float, source: str | None, label: str | None,
             comment: str | None, expected: str | None, url: str,
             api_key: str | None) -> None:  # fmt: skip
    """Post feedback (SCORE: 0..1, higher better) on a succeeded prediction; prints it."""
    try:
        fields = json.loads(expected) if expected is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--expected") from None
    with _client(url, api_key) as fleet:
        try:
            out = fleet.feedback(prediction_id, score, source=source, label=label,
                                 comment=comment, expected=fields)  # fmt: skip
        except ClientError as exc:
            _fail(exc)
    click.echo(json.dumps(out.model_dump(exclude_none=True)))


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@click.command("report")
@click.argument("program")
@click.option("--since", default=None, help="A date or ISO 8601 time (default: 7 days ago).")
@click.option("--control", default=None, help="The variant to compare with (default: first).")
@click.option("--source", default=None, help="Only this source's feedback.")
@click.option("--version", "version", default=None, help="Only jobs of this program version.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON.")
@URL
@API_KEY
def report(program: str, since: str | None, control: str | None, source: str | None,
           version: str | None, as_json: bool, url: str, api_key: str | None) -> None:  # fmt: skip
    """The A/B report of PROGRAM's variants: a table and the verdict line."""
    with _client(url, api_key) as fleet:
        try:
            body = fleet.report(
                program, since=since, control=control, source=source, version=version
            )
        except ClientError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(f"{program}: jobs finished since {body['since']} (control: {body['control']})")
    click.echo(f"{'variant':<16}{'n':>7}{'success':>9}{'p50 ms':>9}{'p95 ms':>9}"
               f"{'$/req':>12}{'fb n':>7}{'fb mean':>9}")  # fmt: skip
    for name, v in body["variants"].items():
        rate = v["success_rate"]
        shown = "-" if rate is None else f"{rate * 100:.1f}%"
        click.echo(
            f"{name:<16}{v['n']:>7}{shown:>9}"
            f"{_fmt(v['latency_ms']['p50']):>9}{_fmt(v['latency_ms']['p95']):>9}"
            f"{_fmt(v['cost_per_request_usd'], '.6f'):>12}{v['feedback']['n']:>7}"
            f"{_fmt(v['feedback']['mean_score'], '.3f'):>9}"
        )
    click.echo(body["verdict"])
