"""`dspy-fleet examples export` and `dspy-fleet traces`: a program's kept traces, and the
DSPy training examples built from them, through the API (nothing here needs Redis or DSPy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dspy_fleet.cli.loop import API_KEY, URL, _client, _fail
from dspy_fleet.errors import ClientError

_SINCE = click.option("--since", default=None, help="A date or ISO 8601 time (default: all kept).")
_VARIANT = click.option("--variant", default=None, help="Only this variant's jobs ('none': none).")
_VERSION = click.option("--version", "version", default=None, help="Only this program version.")


@click.group("examples")
def examples() -> None:
    """DSPy training examples from a program's kept traces."""


@examples.command("export")
@click.argument("program")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON lines here (default: standard output).")  # fmt: skip
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="Only examples whose mean feedback score is at least this.")  # fmt: skip
@_SINCE
@_VARIANT
@_VERSION
@URL
@API_KEY
def export(program: str, output: Path | None, min_score: float | None, since: str | None,
           variant: str | None, version: str | None, url: str,
           api_key: str | None) -> None:  # fmt: skip
    """Write PROGRAM's examples as JSON lines that dspy.Example(**record) loads; prints how."""
    with _client(url, api_key) as fleet:
        try:
            fields, records = fleet.examples(program, since=since, variant=variant,
                                             version=version, min_score=min_score)  # fmt: skip
            out = output.open("w", encoding="utf-8") if output is not None else sys.stdout
            n = 0
            try:
                for record in records:
                    out.write(json.dumps(record, separators=(",", ":")) + "\n")
                    n += 1
            finally:
                if output is not None:
                    out.close()
        except ClientError as exc:
            _fail(exc)
    where = str(output) if output is not None else "standard output"
    inputs = ", ".join(repr(f) for f in fields)
    click.echo(f"{n} examples of {program} written to {where}; load them with:\n"
               f"  [dspy.Example(**json.loads(line)).with_inputs({inputs}) "
               f"for line in open({where!r})]", err=True)  # fmt: skip


@click.command("traces")
@click.argument("program")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@_SINCE
@_VARIANT
@_VERSION
@URL
@API_KEY
def traces(program: str, limit: int, since: str | None, variant: str | None,
           version: str | None, url: str, api_key: str | None) -> None:  # fmt: skip
    """PROGRAM's newest kept traces, one JSON object a line, newest first."""
    with _client(url, api_key) as fleet:
        try:
            found = fleet.traces(program, since=since, variant=variant, version=version,
                                 limit=limit)  # fmt: skip
        except ClientError as exc:
            _fail(exc)
    for trace in found:
        click.echo(json.dumps(trace, separators=(",", ":")))
