"""``manage.py chancy ...``: Chancy's command line on the project's Chancy.

Every ``chancy`` command works (``misc migrate``, ``queue list``, ``job get ID``...);
``--app`` is filled in with the project's Chancy. ``worker start`` first declares the
``TASKS`` backend's queues (with Django set up in Process executor children).
"""

from __future__ import annotations

import argparse
from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError

from chancy.contrib.django import _tasks_backend

APP = "chancy.contrib.django:get_chancy"


def run_cli(args: list[str], *, standalone: bool) -> Any:
    """Run the ``chancy`` CLI with ``args`` against the project's Chancy."""
    from chancy.cli import main

    if args[:2] == ["worker", "start"]:
        backend = _tasks_backend()
        if backend is not None:
            try:
                backend.declare_queues()
            except psycopg.errors.UndefinedTable:
                raise CommandError(
                    "Chancy's tables are missing: run `manage.py chancy misc migrate` first"
                ) from None
    return main.main(
        args=["--app", APP, *args], prog_name="manage.py chancy", standalone_mode=standalone
    )


class Command(BaseCommand):
    help = "Chancy's command line (try `manage.py chancy --help`)."

    def run_from_argv(self, argv: list[str]) -> None:
        # Click parses the arguments, not argparse: hand over everything after the name.
        run_cli(argv[2:], standalone=True)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("args", nargs=argparse.REMAINDER)

    def handle(self, *args: str, **options: Any) -> None:
        import click

        try:
            run_cli(list(args), standalone=False)
        except click.exceptions.Exit as exc:
            if exc.exit_code:
                raise CommandError(f"exit code {exc.exit_code}") from None
        except click.ClickException as exc:
            raise CommandError(exc.format_message()) from None
