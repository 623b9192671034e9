"""``chancy demo``: push and run jobs end to end, on an embedded PostgreSQL if need be."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from chancy.app import Chancy
from chancy.cli.context import CliState, check_connection, pass_state
from chancy.job import FINISHED_STATES, Job, QueuedJob, Reference
from chancy.queue import Queue
from chancy.worker import Worker

_EXECUTORS = {
    "async": (Chancy.Executor.Async, "chancy.cli.demo_jobs.async_square"),
    "threaded": (Chancy.Executor.Threaded, "chancy.cli.demo_jobs.square"),
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs."""

    jobs: int
    queue: str
    executor: str
    concurrency: int
    fail_every: int
    timeout: float
    fresh_queue: bool = False

    def should_fail(self, n: int) -> bool:
        """True for the jobs that fail on purpose (every ``fail_every``-th one)."""
        return self.fail_every > 0 and (n + 1) % self.fail_every == 0

    def make_jobs(self) -> Iterator[Job]:
        """The demo jobs, numbered from 0."""
        func = _EXECUTORS[self.executor][1]
        for n in range(self.jobs):
            yield Job(func=func, queue=self.queue, kwargs={"n": n, "fail": self.should_fail(n)})


@dataclasses.dataclass
class DemoResult:
    """How the demo went, read back from the database."""

    states: collections.Counter[str]
    elapsed: float
    push_elapsed: float
    first_error: str | None


class _Progress:
    """Counts this demo's jobs reaching a final state, from the worker's local events."""

    def __init__(self) -> None:
        self.ours: set[Reference] = set()
        self.early: set[Reference] = set()  # finished before their push returned
        self.finished = 0
        self.changed = asyncio.Event()

    def pushed(self, refs: list[Reference]) -> None:
        for ref in refs:
            self.ours.add(ref)
            if ref in self.early:
                self.early.discard(ref)
                self.finished += 1
        self.changed.set()

    def on_completed(self, name: str, outcome: Any) -> None:
        if outcome.state not in FINISHED_STATES:
            return
        ref = outcome.job.id
        if ref in self.ours:
            self.finished += 1
        else:
            self.early.add(ref)
        self.changed.set()


async def run_demo(chancy: Chancy, settings: DemoSettings) -> DemoResult:
    """Migrate, declare the demo queue, run a worker in this process and push the jobs;
    returns once every job has finished."""
    await check_connection(chancy)
    async with chancy:
        await chancy.migrate()
        if settings.fresh_queue:
            # Only in the demo's own database: jobs left by an interrupted run would skew
            # the numbers. A queue of that name elsewhere may be someone's real queue.
            await chancy.delete_queue(settings.queue)
        executor, _ = _EXECUTORS[settings.executor]
        await chancy.declare(
            Queue(
                settings.queue,
                executor=executor,
                concurrency=settings.concurrency,
                polling_interval=1,
            ),
            upsert=True,
        )
        progress = _Progress()
        async with Worker(
            chancy, queues=[settings.queue], register_signal_handlers=False, shutdown_timeout=5
        ) as worker:
            worker.hub.on("job.completed", progress.on_completed)
            started = time.monotonic()
            refs: list[Reference] = []
            batch_size = max(1, min(1000, math.ceil(settings.jobs / 20)))
            with click.progressbar(length=settings.jobs, label="Pushing", file=sys.stderr) as bar:
                async for batch in chancy.push_many(settings.make_jobs(), batch_size=batch_size):
                    refs.extend(batch)
                    progress.pushed(batch)
                    bar.update(len(batch))
            push_elapsed = time.monotonic() - started
            deadline = started + settings.timeout
            with click.progressbar(length=settings.jobs, label="Running", file=sys.stderr) as bar:
                while progress.finished < settings.jobs:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise click.ClickException(
                            f"only {progress.finished} of {settings.jobs} jobs finished "
                            f"within {settings.timeout:g} s"
                        )
                    progress.changed.clear()
                    try:
                        await asyncio.wait_for(progress.changed.wait(), min(remaining, 1))
                    except TimeoutError:
                        pass
                    bar.update(progress.finished - bar.pos)
            # The events fire just before outcomes are written; read the truth back.
            remaining = max(deadline - time.monotonic(), 30)
            try:
                jobs = await chancy.wait_for_jobs(refs, interval=1, timeout=remaining)
            except TimeoutError as exc:
                raise click.ClickException(f"jobs ran but were not all recorded: {exc}") from None
            elapsed = time.monotonic() - started
    return DemoResult(
        states=collections.Counter(j.state.value for j in jobs),
        elapsed=elapsed,
        push_elapsed=push_elapsed,
        first_error=_first_error(jobs, settings),
    )


def _first_error(jobs: list[QueuedJob], settings: DemoSettings) -> str | None:
    for queued in jobs:
        unexpected = queued.state != QueuedJob.State.SUCCEEDED and not settings.should_fail(
            int(queued.kwargs["n"])
        )
        if unexpected:
            lines = [e.get("traceback", "") for e in queued.errors] or [queued.state.value]
            return str(lines[-1]).strip().splitlines()[-1]
    return None


@click.command()
@click.option("--dsn", metavar="DSN", help="Use this PostgreSQL instead of an embedded one.")
@click.option("--jobs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory of the embedded PostgreSQL (default: the user data directory).",
)
@click.option("--queue", default="demo", show_default=True)
@click.option(
    "--executor", type=click.Choice(sorted(_EXECUTORS)), default="async", show_default=True
)
@click.option("--concurrency", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--fail-every",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Make every Nth job fail on purpose, to see failures reported.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600,
    show_default=True,
    help="Give up after this many seconds.",
)
@pass_state
def demo(
    state: CliState,
    dsn: str | None,
    jobs: int,
    data_dir: Path | None,
    queue: str,
    executor: str,
    concurrency: int,
    fail_every: int,
    timeout: float,
) -> None:
    """Run a worker and push demo jobs through it, then print a summary.

    Without --dsn or --app, starts an embedded PostgreSQL (pip install 'chancy[embedded]'),
    so nothing needs to be installed or configured.
    """
    state.configure_logging(default="WARNING")
    Queue(queue)  # validate the name before starting anything
    embedded = dsn is None and not state.app_path
    settings = DemoSettings(jobs, queue, executor, concurrency, fail_every, timeout, embedded)
    server = None
    if not embedded:
        if data_dir is not None:
            raise click.UsageError("--data-dir is only for the embedded PostgreSQL")
        chancy = Chancy(dsn) if dsn is not None else state.chancy()
    else:
        from chancy.embedded import default_data_dir, start_embedded_postgres

        where = data_dir or default_data_dir()
        click.echo(f"Starting the embedded PostgreSQL in {where} ...", err=True)
        try:
            embedded_dsn, server = start_embedded_postgres(where)
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None
        chancy = Chancy(embedded_dsn)
    try:
        with _sigterm_as_sigint():
            result = asyncio.run(run_demo(chancy, settings))
    finally:
        if server is not None:
            server.cleanup()
    _print_summary(settings, result)
    expected_failures = sum(settings.should_fail(n) for n in range(jobs))
    if result.states.get("succeeded", 0) != jobs - expected_failures:
        raise click.ClickException(f"some jobs did not succeed: {result.first_error}")


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the worker stops and the embedded server is shut down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_summary(settings: DemoSettings, result: DemoResult) -> None:
    rate = settings.jobs / result.elapsed if result.elapsed > 0 else float("inf")
    click.echo(
        f"Ran {settings.jobs} jobs on queue {settings.queue!r} "
        f"({settings.executor} executor, concurrency {settings.concurrency}):"
    )
    click.echo(f"  succeeded   {result.states.get('succeeded', 0)}")
    click.echo(f"  failed      {result.states.get('failed', 0)}")
    others = {k: v for k, v in result.states.items() if k not in ("succeeded", "failed")}
    for state_name, count in sorted(others.items()):
        click.echo(f"  {state_name:<11} {count}")
    click.echo(f"  elapsed     {result.elapsed:.2f} s (pushing {result.push_elapsed:.2f} s)")
    click.echo(f"  throughput  {rate:.1f} jobs/s")
