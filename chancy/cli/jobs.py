"""``chancy job ...``: inspect, cancel and retry single jobs."""

from __future__ import annotations

import click

from chancy.app import Chancy
from chancy.cli.context import CliState, fail, pass_state, run_with_app, to_json
from chancy.job import QueuedJob


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
    click.echo(to_json(found.to_dict()))


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
        fail(
            f"job {job_id} does not exist, has not finished yet, "
            "or another live job holds its unique key"
        )
    click.echo(f"Job {job_id} will run again.")
