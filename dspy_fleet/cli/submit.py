"""`dspy-fleet submit input.jsonl -o results.jsonl [--direct]`: batch producer, progress bar.

Each input line is a JSON object with ``custom_id`` plus the predict fields. Items
go over HTTP (POST /v1/batches, in chunks) or, with ``--direct``, straight onto the
broker (dspy_fleet.broker.producer). Each finished item is appended to the output file as one
line keyed by ``custom_id`` and flushed at once, so an interrupted run loses
nothing: rerunning the same command skips the custom_ids already in the output.
Items carry an idempotency key derived from their content, so an item that was
submitted but not yet written when the run stopped is not computed twice.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click
from pydantic import ValidationError

from dspy_fleet.broker.producer import result_line, stable_request_id
from dspy_fleet.contract import TERMINAL_STATUSES as TERMINAL
from dspy_fleet.contract import BatchItem, field_errors

EXIT_FAILED_ITEMS = 1
EXIT_INTERRUPTED = 130
EXIT_ERROR = 3


@dataclass
class Plan:
    """What this run has to do."""

    todo: list[dict[str, Any]] = field(default_factory=list)  # items to submit, in order
    done: set[str] = field(default_factory=set)  # custom_ids already in the output
    invalid: list[dict[str, Any]] = field(default_factory=list)  # result lines for bad inputs
    total: int = 0


def read_done(output: Path) -> set[str]:
    """custom_ids already in the output; a torn last line (a killed run) is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with output.open("r+b") as fh:
            fh.truncate(keep)
    done = set()
    for line in data[:keep].splitlines():
        if line.strip():
            done.add(json.loads(line)["custom_id"])
    return done


def plan(input_path: Path, output: Path, defaults: dict[str, Any]) -> Plan:
    """Read the input, skip what the output already has, validate the rest."""
    result = Plan(done=read_done(output))
    seen: set[str] = set()
    with input_path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            result.total += 1
            try:
                raw = json.loads(line)
                custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
            except json.JSONDecodeError as exc:
                raw, custom_id = None, None
                problem = f"line {number} is not valid JSON: {exc.msg}"
            if not isinstance(custom_id, str) or not custom_id:
                problem = problem if raw is None else f"line {number} has no string custom_id"
                click.echo(f"dspy-fleet submit: skipping {problem}", err=True)
                result.invalid.append(
                    {
                        "custom_id": None,
                        "line": number,
                        "status": "failed",
                        "error": {"code": "invalid_item", "message": problem},
                    }
                )
                continue
            if custom_id in result.done or custom_id in seen:
                continue
            seen.add(custom_id)
            item = {**defaults, **raw}
            item.setdefault("request_id", stable_request_id(item))
            result.todo.append(item)
    return result


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, keeping every line written so far."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Output:
    """The results file: one JSON line per item, flushed as soon as it is known."""

    def __init__(self, path: Path) -> None:
        self.fh: IO[str] = path.open("a", encoding="utf-8")
        self.written: set[str] = set()

    def write(self, line: dict[str, Any]) -> None:
        self.fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.fh.flush()
        if line.get("custom_id") is not None:
            self.written.add(line["custom_id"])

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _http_source(
    items: list[dict[str, Any]], url: str, api_key: str | None, chunk: int
) -> Iterator[list[dict[str, Any]]]:
    """Submit the items as batches of ``chunk``; yield newly ended result lines as they come."""
    from dspy_fleet.client import FleetClient, FleetError

    with FleetClient(url, api_key=api_key, timeout=60) as client:
        open_batches: dict[str, int] = {}  # batch id -> items ended (as last counted)
        start = 0
        while start < len(items):
            try:
                created = client.batch(items[start : start + chunk])
            except FleetError as exc:
                limit = exc.details.get("max_items") if exc.code == "too_many_items" else None
                if not isinstance(limit, int) or limit >= chunk:
                    raise
                chunk = limit  # the server's batch limit is lower: send smaller batches
                continue
            if created.rejected:
                # Redis refused part of the records. Stop: a rerun resubmits every item not
                # yet in OUT, and each item's stable request_id names the same job again,
                # so the accepted ones do not run twice.
                raise RuntimeError(
                    f"Redis refused {len(created.rejected)} items of batch {created.id}"
                )
            open_batches[created.id] = -1
            start += chunk
        seen: set[str] = set()
        while open_batches:
            fresh: list[dict[str, Any]] = []
            for batch_id, ended_before in list(open_batches.items()):
                counts = client.get_batch(batch_id).counts
                ended = counts.total - counts.pending
                if ended == ended_before:
                    continue
                for line in client.batch_results(batch_id):
                    key = line.get("custom_id")
                    if key is not None and key not in seen:
                        seen.add(key)
                        line.pop("index", None)
                        fresh.append(line)
                open_batches[batch_id] = ended
                if counts.pending == 0:
                    del open_batches[batch_id]
            yield fresh


def _direct_source(
    items: list[dict[str, Any]], redis_url: str | None, tenant: str
) -> Iterator[list[dict[str, Any]]]:
    """Push the items onto the broker; yield newly ended result lines as they come."""
    from dspy_fleet.broker.producer import Producer

    with Producer(redis_url=redis_url, tenant=tenant) as producer:
        pending: dict[str, str] = {}  # job id -> custom_id
        invalid: list[dict[str, Any]] = []
        valid: list[BatchItem] = []
        for item in items:
            try:
                valid.append(BatchItem.model_validate(item))
            except ValidationError as exc:
                errors = field_errors(exc, root="(item)")
                invalid.append(
                    {
                        "custom_id": item["custom_id"],
                        "id": None,
                        "status": "failed",
                        "error": {
                            "code": "validation_error",
                            "message": "invalid item",
                            "details": {"errors": errors},
                        },
                    }
                )
        ids = producer.submit_many(valid)
        pending = {job_id: item.custom_id for job_id, item in zip(ids, valid, strict=True)}
        yield invalid
        while pending:
            fresh = []
            order = list(pending)
            for job_id, job in zip(order, producer.get_many(order), strict=True):
                if job is not None and job.get("status") in TERMINAL:
                    fresh.append(result_line(pending.pop(job_id), job))
            yield fresh


def _summary(output: Path) -> tuple[dict[str, int], float, bool]:
    counts: dict[str, int] = {}
    cost = 0.0
    unknown_cost = False
    for line in output.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        counts[rec.get("status", "failed")] = counts.get(rec.get("status", "failed"), 0) + 1
        usd = (rec.get("cost") or {}).get("cost_usd")
        if usd is None and rec.get("status") == "succeeded":
            unknown_cost = True
        cost += usd or 0.0
    return counts, cost, unknown_cost


@click.command("submit")
@click.argument(
    "input_path",
    metavar="INPUT.jsonl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Results JSONL (appended to; custom_ids already in it are skipped).",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Push straight onto the broker (DSPY_FLEET_REDIS_URL) instead of the API.",
)
@click.option(
    "--url",
    default="http://127.0.0.1:8080",
    envvar="DSPY_FLEET_API_URL",
    show_default=True,
    help="The API (env DSPY_FLEET_API_URL).",
)
@click.option(
    "--api-key",
    envvar="DSPY_FLEET_API_KEY",
    default=None,
    help="Bearer key for the API (env DSPY_FLEET_API_KEY).",
)
@click.option("--redis-url", default=None, help="--direct: the broker (default: settings).")
@click.option("--tenant", default="anonymous", show_default=True, help="--direct: job tenant.")
@click.option("--program", default=None, help="Default program for items that name none.")
@click.option("--model", default=None, help="Default model for items that name none.")
@click.option(
    "--priority",
    type=click.Choice(["batch", "interactive"]),
    default="batch",
    show_default=True,
    help="Default lane for items that name none.",
)
@click.option(
    "--chunk-size",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Items per POST /v1/batches.",
)
@click.option("--poll-interval", default=0.5, show_default=True, type=click.FloatRange(0.05))
@click.option("--no-progress", is_flag=True, help="No progress bar (it goes to stderr).")
def command(
    input_path: Path,
    output: Path,
    direct: bool,
    url: str,
    api_key: str | None,
    redis_url: str | None,
    tenant: str,
    program: str | None,
    model: str | None,
    priority: str,
    chunk_size: int,
    poll_interval: float,
    no_progress: bool,
) -> None:
    """Run every item of INPUT.jsonl ({"custom_id": …, "input": …} per line) and write one
    result line per custom_id to OUTPUT. Exits 1 if any item failed, 130 if interrupted."""
    from tqdm import tqdm

    defaults = {
        k: v
        for k, v in {"program": program, "model": model, "priority": priority}.items()
        if v is not None
    }
    work = plan(input_path, output, defaults)
    out = Output(output)
    for line in work.invalid:
        out.write(line)
    bar = tqdm(
        total=work.total,
        initial=work.total - len(work.todo) - len(work.invalid),
        unit="item",
        disable=no_progress,
        mininterval=0.25,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    bar.update(len(work.invalid))
    run_cost = 0.0
    previous = {
        sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    source: Callable[[], Iterator[list[dict[str, Any]]]] = (
        (lambda: _direct_source(work.todo, redis_url, tenant))
        if direct
        else (lambda: _http_source(work.todo, url, api_key, chunk_size))
    )
    interrupted = error = None
    try:
        if work.todo:
            for fresh in source():
                for line in fresh:
                    out.write(line)
                    run_cost += (line.get("cost") or {}).get("cost_usd") or 0.0
                bar.update(len(fresh))
                bar.set_postfix(cost=f"${run_cost:.6f}", refresh=False)
                if bar.n < work.total:
                    time.sleep(poll_interval)
    except Interrupted as exc:
        interrupted = str(exc)
    except Exception as exc:  # the API or broker failed: keep what we have, say so
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        out.close()
    counts, cost, unknown = _summary(output)
    written = sum(counts.values())
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    click.echo(
        f"dspy-fleet submit: {written}/{work.total} items in {output} ({parts or 'none'}); "
        f"total cost ${cost:.6f}"
        + (" (some costs unknown)" if unknown else "")
        + f"; this run ${run_cost:.6f}"
    )
    if interrupted or error:
        click.echo(
            f"dspy-fleet submit: stopped ({interrupted or error}); rerun the same "
            "command to resume",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_ERROR)
    if any(status != "succeeded" for status in counts):
        sys.exit(EXIT_FAILED_ITEMS)
