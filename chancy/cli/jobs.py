"""``chancy job ...``: inspect, cancel and retry single jobs."""

from __future__ import annotations

from typing import Any

import click

from chancy.app import Chancy
from chancy.cli.context import CliState, fail, pass_state, run_with_app, to_json
from chancy.job import QueuedJob


def job_to_dict(queued: QueuedJob) -> dict[str, Any]:
    """A JSON-friendly form of a stored job."""
    return {
        "id": str(queued.id),
        "queue": queued.queue,
        "func": queued.func,
        "kwargs": dict(queued.kwargs),
        "state": queued.state.value,
        "priority": queued.priority,
        "attempts": queued.attempts,
        "max_attempts": queued.max_attempts,
        "unique_key": queued.unique_key,
        "limits": [limit.to_dict() for limit in queued.limits],
        "meta": dict(queued.meta),
        "created_at": queued.created_at,
        "scheduled_at": queued.scheduled_at,
        "started_at": queued.started_at,
        "completed_at": queued.completed_at,
        "taken_by": queued.taken_by,
        "result": queued.result,
        "errors": list(queued.errors),
    }


@click.group()
def job() -> None:
    """Inspect, cancel and retry jobs."""


@job.command()
@click.argument("job_id", metavar="ID")
@pass_state
def get(state: CliState, job_id: str) -> None:
    """Print job ID as JSON."""

    async def run(chancy: Chancy) -> QueuedJob | None:
        return await chancy.get_job(job_id)

    found = run_with_app(state, run)
    if found is None:
        fail(f"no job {job_id}")
    click.echo(to_json(job_to_dict(found)))


@job.command()
@click.argument("job_id", metavar="ID")
@pass_state
def cancel(state: CliState, job_id: str) -> None:
    """Cancel job ID if it is pending, retrying or running."""

    async def run(chancy: Chancy) -> bool:
        return await chancy.cancel_job(job_id)

    if not run_with_app(state, run):
        fail(f"job {job_id} does not exist or has already finished")
    click.echo(f"Cancelled job {job_id}.")


@job.command()
@click.argument("job_id", metavar="ID")
@pass_state
def retry(state: CliState, job_id: str) -> None:
    """Run the finished (failed, cancelled or succeeded) job ID again."""

    async def run(chancy: Chancy) -> bool:
        return await chancy.retry_job(job_id)

    if not run_with_app(state, run):
        fail(f"job {job_id} does not exist or has not finished yet")
    click.echo(f"Job {job_id} will run again.")
