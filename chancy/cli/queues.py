"""``chancy queue ...``: declare, inspect and control queues; push jobs."""

from __future__ import annotations

import click

from chancy.app import Chancy
from chancy.cli.context import (
    CliState,
    fail,
    parse_datetime,
    parse_json_object,
    pass_state,
    run_with_app,
    to_json,
)
from chancy.job import Job
from chancy.queue import Queue

#: Short executor names accepted by ``--executor``, besides any import path.
EXECUTORS = {member.name.lower(): member.value for member in Chancy.Executor}
_SHORT_NAMES = {path: name for name, path in EXECUTORS.items()}


def _executor(value: str) -> str:
    path = EXECUTORS.get(value.lower(), value)
    if "." not in path:
        choices = ", ".join(EXECUTORS)
        raise click.BadParameter(
            f"{value!r}: use one of {choices} or an import path", param_hint="--executor"
        )
    return path


@click.group()
def queue() -> None:
    """Declare, inspect and control queues; push jobs."""


@queue.command()
@click.argument("name")
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs run at once per worker.")
@click.option(
    "--executor",
    "-e",
    default="process",
    show_default=True,
    metavar="|".join(EXECUTORS) + "|PATH",
    help="How jobs run: a built-in executor or an Executor's import path.",
)
@click.option(
    "--polling-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5,
    show_default=True,
    help="Seconds between polls of an idle queue.",
)
@click.option(
    "--tags", "-t", multiple=True, metavar="REGEX", help="Worker tags to match (repeatable)."
)
@click.option("--rate-limit", type=click.IntRange(min=1), help="Jobs per --rate-limit-window.")
@click.option("--rate-limit-window", type=click.IntRange(min=1), help="Window in seconds.")
@click.option("--upsert", is_flag=True, help="Replace the settings of an existing queue.")
@pass_state
def declare(
    state: CliState,
    name: str,
    concurrency: int | None,
    executor: str,
    polling_interval: float,
    tags: tuple[str, ...],
    rate_limit: int | None,
    rate_limit_window: int | None,
    upsert: bool,
) -> None:
    """Create queue NAME (or, with --upsert, update its settings)."""
    wanted = Queue(
        name,
        concurrency=concurrency,
        executor=_executor(executor),
        polling_interval=polling_interval,
        tags=tags or None,
        rate_limit=rate_limit,
        rate_limit_window=rate_limit_window,
    )

    async def run(chancy: Chancy) -> Queue:
        return await chancy.declare(wanted, upsert=upsert)

    stored = run_with_app(state, run)
    if not upsert and _settings(stored) != _settings(wanted):
        click.echo(
            f"Queue {name!r} already exists with other settings; use --upsert to replace them.",
            err=True,
        )
    click.echo(f"Declared queue {stored.name!r} ({_describe(stored)}).")


def _settings(q: Queue) -> dict[str, object]:
    settings = q.to_dict()
    for runtime_field in ("state", "resume_at"):
        settings.pop(runtime_field)
    return settings


def _describe(q: Queue) -> str:
    concurrency = "default" if q.concurrency is None else str(q.concurrency)
    return f"{_SHORT_NAMES.get(q.executor, q.executor)} executor, concurrency {concurrency}"


@queue.command("list")
@click.option("--json", is_flag=True, help="Print JSON instead of a table.")
@pass_state
def list_queues(state: CliState, json: bool) -> None:
    """List the declared queues."""

    async def run(chancy: Chancy) -> list[Queue]:
        return await chancy.get_all_queues()

    queues = sorted(run_with_app(state, run), key=lambda q: q.name)
    if json:
        click.echo(to_json([q.to_dict() for q in queues]))
        return
    if not queues:
        click.echo("No queues declared.")
        return
    rows = [("NAME", "STATE", "EXECUTOR", "CONCURRENCY", "POLLING", "TAGS")]
    for q in queues:
        state_text = q.state.value
        if q.resume_at is not None:
            state_text += f" until {q.resume_at.isoformat(timespec='seconds')}"
        rows.append(
            (
                q.name,
                state_text,
                _SHORT_NAMES.get(q.executor, q.executor),
                "default" if q.concurrency is None else str(q.concurrency),
                f"{q.polling_interval:g}s",
                ",".join(sorted(q.tags)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@queue.command()
@click.argument("name")
@click.argument("func")
@click.option("--kwargs", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--unique-key", metavar="KEY", help="Deduplicate against live jobs with this key.")
@click.option("--scheduled-at", metavar="ISO8601", help="Do not run before this time.")
@pass_state
def push(
    state: CliState,
    name: str,
    func: str,
    kwargs: str | None,
    priority: int,
    max_attempts: int,
    unique_key: str | None,
    scheduled_at: str | None,
) -> None:
    """Push a job running FUNC (module.function) to queue NAME; prints its id."""
    the_job = Job(
        func=func,
        queue=name,
        kwargs=parse_json_object(kwargs, "--kwargs"),
        priority=priority,
        max_attempts=max_attempts,
        unique_key=unique_key,
        scheduled_at=parse_datetime(scheduled_at, "--scheduled-at") if scheduled_at else None,
    )

    async def run(chancy: Chancy) -> tuple[str, bool]:
        (result,) = await chancy.push_detailed([the_job])
        return str(result.reference), result.inserted

    job_id, inserted = run_with_app(state, run)
    if not inserted:
        click.echo(f"A live job with unique key {unique_key!r} already exists.", err=True)
    click.echo(job_id)


@queue.command()
@click.argument("name")
@click.option("--resume-at", metavar="ISO8601", help="Resume automatically at this time.")
@pass_state
def pause(state: CliState, name: str, resume_at: str | None) -> None:
    """Stop workers from fetching jobs from queue NAME."""
    when = parse_datetime(resume_at, "--resume-at") if resume_at else None

    async def run(chancy: Chancy) -> Queue:
        return await chancy.pause_queue(name, resume_at=when)

    paused = run_with_app(state, run)
    until = f" until {paused.resume_at.isoformat()}" if paused.resume_at else ""
    click.echo(f"Paused queue {name!r}{until}.")


@queue.command()
@click.argument("name")
@pass_state
def resume(state: CliState, name: str) -> None:
    """Let workers fetch jobs from queue NAME again."""

    async def run(chancy: Chancy) -> Queue:
        return await chancy.resume_queue(name)

    run_with_app(state, run)
    click.echo(f"Resumed queue {name!r}.")


@queue.command()
@click.argument("name")
@click.option("--keep-jobs", is_flag=True, help="Keep the queue's jobs in the database.")
@pass_state
def delete(state: CliState, name: str, keep_jobs: bool) -> None:
    """Delete queue NAME and (unless --keep-jobs) its jobs."""

    async def run(chancy: Chancy) -> bool:
        return await chancy.delete_queue(name, purge_jobs=not keep_jobs)

    if not run_with_app(state, run):
        fail(f"no queue named {name!r}")
    click.echo(f"Deleted queue {name!r}{' (jobs kept)' if keep_jobs else ''}.")
