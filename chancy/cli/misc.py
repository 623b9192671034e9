"""``chancy misc ...``: migrations and an interactive shell."""

from __future__ import annotations

import asyncio
import code
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

import chancy as chancy_module
from chancy.app import Chancy
from chancy.cli.context import CliState, fail, pass_state, run_with_app

T = TypeVar("T")


@click.group()
def misc() -> None:
    """Migrations and other maintenance."""


@misc.command()
@click.option(
    "--to-version",
    type=click.IntRange(min=0),
    help="Move the core schema up or down to this version (default: apply everything).",
)
@pass_state
def migrate(state: CliState, to_version: int | None) -> None:
    """Apply pending migrations (core and plugins)."""

    async def run(chancy: Chancy) -> None:
        await chancy.migrate(to_version=to_version)

    run_with_app(state, run)
    target = "the latest version" if to_version is None else f"version {to_version}"
    click.echo(f"Migrated to {target}.")


@misc.command("check-migrations")
@pass_state
def check_migrations(state: CliState) -> None:
    """Exit with status 1 if migrations are pending, 0 if the schema is up to date."""

    async def run(chancy: Chancy) -> bool:
        return await chancy.is_up_to_date()

    if not run_with_app(state, run):
        fail("migrations are pending: run `chancy misc migrate`")
    click.echo("The database schema is up to date.")


class _LoopThread:
    """An event loop in a daemon thread, so a plain REPL can run coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@misc.command()
@pass_state
def shell(state: CliState) -> None:
    """An interactive Python shell with ``chancy`` connected.

    Sync methods work directly (``chancy.sync_push(...)``); run async ones with
    ``run(chancy.get_all_queues())``.
    """
    chancy = state.chancy()
    loop = _LoopThread()
    try:
        loop.run(chancy.__aenter__())
        with chancy:
            names = {name: getattr(chancy_module, name) for name in chancy_module.__all__}
            banner = (
                f"Chancy {chancy_module.__version__} shell. `chancy` is connected; "
                "run coroutines with run(coro), e.g. run(chancy.get_all_queues())."
            )
            code.interact(
                banner=banner,
                local={**names, "chancy": chancy, "run": loop.run},
                exitmsg="",
            )
    finally:
        loop.run(chancy.__aexit__(None, None, None))
        loop.close()
