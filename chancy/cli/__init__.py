"""The ``chancy`` command line (``pip install chancy[cli]``).

``chancy --app module:attribute COMMAND ...`` where the attribute is a :class:`~chancy.Chancy`
(or a zero-argument callable returning one). Every option can also come from the
environment: ``CHANCY_APP``, ``CHANCY_LOG_LEVEL``, ``CHANCY_WORKER_START_CONCURRENCY``...
"""

from __future__ import annotations

from typing import Any

import click

from chancy import __version__
from chancy.cli.context import CliState, translate_errors
from chancy.cli.demo import demo
from chancy.cli.jobs import job
from chancy.cli.misc import misc
from chancy.cli.queues import queue
from chancy.cli.worker import worker

__all__ = ["main"]


class ChancyGroup(click.Group):
    """The root group: Chancy errors from any command become a clean one-line message."""

    def invoke(self, ctx: click.Context) -> Any:
        return translate_errors(lambda: super(ChancyGroup, self).invoke(ctx))


@click.group(
    cls=ChancyGroup,
    context_settings={
        "auto_envvar_prefix": "CHANCY",
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
    },
)
@click.option(
    "--app",
    "-a",
    metavar="MODULE:ATTRIBUTE",
    help="Where to find the Chancy instance (or a zero-argument factory returning one).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Logging level on stderr (default: info for workers, warning otherwise).",
)
@click.version_option(__version__, prog_name="chancy")
@click.pass_context
def main(ctx: click.Context, app: str | None, log_level: str | None) -> None:
    """Chancy: a PostgreSQL-backed job queue."""
    ctx.obj = CliState(app_path=app, log_level=log_level)


for command in (worker, misc, queue, job, demo):
    main.add_command(command)
