"""``chancy worker ...``: run workers."""

from __future__ import annotations

import click

from chancy.app import Chancy
from chancy.cli.context import CliState, pass_state, run_with_app
from chancy.worker import Worker, exit_if_threads_linger


@click.group()
def worker() -> None:
    """Run workers."""


@worker.command("start")
@click.option(
    "--queue",
    "-q",
    multiple=True,
    metavar="NAME",
    help="Serve only this queue (repeatable; default: every queue matching the tags).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Jobs run at once per queue, overriding each queue's own setting.",
)
@click.option("--tags", "-t", multiple=True, metavar="TAG", help="Extra worker tag (repeatable).")
@click.option("--worker-id", metavar="ID", help="Stable worker id (default: a random UUID).")
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    help="Seconds running jobs get to finish on SIGTERM/SIGINT before being handed back.",
)
@pass_state
def start(
    state: CliState,
    queue: tuple[str, ...],
    concurrency: int | None,
    tags: tuple[str, ...],
    worker_id: str | None,
    shutdown_timeout: float,
) -> None:
    """Serve jobs until SIGTERM or SIGINT (a second signal exits at once)."""
    state.configure_logging(default="INFO")

    async def serve(chancy: Chancy) -> None:
        the_worker = Worker(
            chancy,
            worker_id=worker_id,
            queues=queue or None,
            concurrency=concurrency,
            tags=tags,
            shutdown_timeout=shutdown_timeout,
        )
        served = ", ".join(queue) if queue else "all matching queues"
        click.echo(f"worker {the_worker.worker_id} serving {served}", err=True)
        await the_worker.start()
        click.echo(f"worker {the_worker.worker_id} stopped", err=True)

    run_with_app(state, serve)
    exit_if_threads_linger()


from chancy.cli.web import web  # noqa: E402 - the dashboard command lives in its own module

worker.add_command(web)
