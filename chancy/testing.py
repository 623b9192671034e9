"""Helpers for testing code that uses Chancy, and a pytest plugin.

- :func:`run_pending` / :func:`sync_run_pending` run due jobs inline, in the test's own
  process and thread, and record their outcomes with the same store operations a worker
  uses (claim, complete, retry).
- :func:`assert_pushed` / :func:`sync_assert_pushed` check that a job was enqueued.
- :func:`inline` makes ``push`` run the job at once.
- The pytest plugin (loaded automatically once Chancy is installed, or with
  ``pytest_plugins = ["chancy.testing"]``) provides the fixtures ``chancy_dsn`` (a schema of
  its own per test) and ``chancy_app`` (a migrated :class:`~chancy.Chancy` on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chancy.app import Chancy
from chancy.executors.base import (
    Execution,
    Kind,
    classify_exception,
    current_job,
    exception_types,
    prepare_call,
)
from chancy.job import Job, JobFunction, QueuedJob, Reference, function_path
from chancy.store import Outcome
from chancy.store import eco as eco_store

#: The ``taken_by`` of jobs run by :func:`run_pending`.
TESTING_WORKER_ID = "chancy-testing"

__all__ = [
    "TESTING_WORKER_ID",
    "assert_not_pushed",
    "assert_pushed",
    "inline",
    "run_pending",
    "sync_assert_not_pushed",
    "sync_assert_pushed",
    "sync_run_pending",
]


# -- running jobs inline ------------------------------------------------------------------


def _outcome(execution: Execution) -> Outcome:
    """How the worker records an execution (without plugin hooks)."""
    job = execution.job
    meta = execution.meta
    if execution.kind is Kind.SUCCEEDED:
        return Outcome(job, "succeeded", meta=meta, result=execution.result)
    if execution.kind is Kind.SNOOZED:
        return Outcome(job, "pending", delay=execution.delay, refund=True, meta=meta)
    state = "retrying" if job.attempts < job.max_attempts else "failed"
    return Outcome(job, state, error=execution.error, meta=meta, exception=execution.exception)


def _failed(job: QueuedJob, exc: BaseException) -> Execution:
    kind, delay = classify_exception(exc)
    return Execution(
        job,
        kind,
        error=traceback.format_exc(),
        delay=delay,
        meta=dict(job.meta),
        exception=exception_types(exc),
    )


async def _execute(job: QueuedJob) -> Execution:
    previous = current_job.get()
    try:
        func, kwargs = prepare_call(job)
        result = func(**kwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        return _failed(job, exc)
    finally:
        current_job.set(previous)
    return Execution(job, Kind.SUCCEEDED, result=result, meta=dict(job.meta))


def _sync_execute(job: QueuedJob) -> Execution:
    previous = current_job.get()
    try:
        func, kwargs = prepare_call(job)
        result = func(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
    except Exception as exc:
        return _failed(job, exc)
    finally:
        current_job.set(previous)
    return Execution(job, Kind.SUCCEEDED, result=result, meta=dict(job.meta))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def run_pending(
    chancy: Chancy, queue: str | None = None, *, max_jobs: int = 10_000
) -> list[QueuedJob]:
    """Run every due job of ``queue`` (default: all queues) in this process until none is
    due, then return the jobs run, as stored now.

    Jobs pushed by the jobs, and retries due at once, run too. Coroutine functions are
    awaited on the current loop, plain functions called in the current thread, so mocks
    and fixtures of the test apply. Plugin hooks, time and memory limits do not apply.
    """
    ran: dict[Reference, None] = {}
    while len(ran) < max_jobs:
        queues = [queue] if queue else await chancy._run(eco_store.due_queues(chancy.store))
        fetched = False
        for name in queues:
            jobs = await chancy._run(chancy.store.fetch_jobs(name, TESTING_WORKER_ID, 1))
            for job in jobs:
                fetched = True
                ran[job.id] = None
                outcome = _outcome(await _execute(job))
                await chancy._run(chancy.store.complete_jobs(TESTING_WORKER_ID, [outcome]))
        if not fetched:
            break
    return _in_order(await chancy.get_jobs(ran), ran)


def sync_run_pending(
    chancy: Chancy, queue: str | None = None, *, max_jobs: int = 10_000
) -> list[QueuedJob]:
    """Sync twin of :func:`run_pending` (needs ``with chancy:``); coroutine functions run
    with :func:`asyncio.run`, so call it outside an event loop."""
    ran: dict[Reference, None] = {}
    while len(ran) < max_jobs:
        queues = [queue] if queue else chancy._sync_run(eco_store.due_queues(chancy.store))
        fetched = False
        for name in queues:
            jobs = chancy._sync_run(chancy.store.fetch_jobs(name, TESTING_WORKER_ID, 1))
            for job in jobs:
                fetched = True
                ran[job.id] = None
                outcome = _outcome(_sync_execute(job))
                chancy._sync_run(chancy.store.complete_jobs(TESTING_WORKER_ID, [outcome]))
        if not fetched:
            break
    return _in_order(chancy.sync_get_jobs(ran), ran)


def _in_order(jobs: list[QueuedJob], order: Mapping[Reference, None]) -> list[QueuedJob]:
    position = {ref: index for index, ref in enumerate(order)}
    return sorted(jobs, key=lambda job: position[job.id])


# -- assertions ---------------------------------------------------------------------------


def _func_path(func: str | Callable[..., Any] | None) -> str | None:
    if func is None or isinstance(func, str):
        return func
    if isinstance(func, JobFunction):
        return func.job.func
    return function_path(func)


def _matching_op(
    chancy: Chancy,
    func: str | Callable[..., Any] | None,
    kwargs: Mapping[str, Any] | None,
    queue: str | None,
    states: Iterable[QueuedJob.State | str] | None,
) -> Any:
    return eco_store.matching_jobs(
        chancy.store,
        func=_func_path(func),
        queue=queue,
        states=[QueuedJob.State(s).value for s in states] if states is not None else None,
        kwargs=kwargs,
    )


def _check_pushed(
    found: list[QueuedJob], count: int | None, func: Any, kwargs: Any, queue: Any
) -> list[QueuedJob]:
    if (count is None and not found) or (count is not None and len(found) != count):
        wanted = "at least one job" if count is None else f"{count} job(s)"
        raise AssertionError(
            f"expected {wanted} matching func={_func_path(func)!r} kwargs={kwargs!r} "
            f"queue={queue!r}; found {len(found)}: {[(j.func, dict(j.kwargs)) for j in found]}"
        )
    return found


async def assert_pushed(
    chancy: Chancy,
    func: str | Callable[..., Any] | None = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    states: Iterable[QueuedJob.State | str] | None = None,
    count: int | None = None,
) -> list[QueuedJob]:
    """Assert that jobs of ``func`` (a path, function or ``@job`` function) were pushed
    whose kwargs include ``kwargs`` (a subset match), in ``queue`` and ``states`` if given:
    at least one, or exactly ``count``. Returns the matching jobs, oldest first."""
    found = await chancy._run(_matching_op(chancy, func, kwargs, queue, states))
    return _check_pushed(found, count, func, kwargs, queue)


def sync_assert_pushed(
    chancy: Chancy,
    func: str | Callable[..., Any] | None = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    states: Iterable[QueuedJob.State | str] | None = None,
    count: int | None = None,
) -> list[QueuedJob]:
    """Sync twin of :func:`assert_pushed`."""
    found = chancy._sync_run(_matching_op(chancy, func, kwargs, queue, states))
    return _check_pushed(found, count, func, kwargs, queue)


async def assert_not_pushed(
    chancy: Chancy,
    func: str | Callable[..., Any] | None = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    states: Iterable[QueuedJob.State | str] | None = None,
) -> None:
    """Assert that no job matches (see :func:`assert_pushed`)."""
    await assert_pushed(chancy, func, kwargs=kwargs, queue=queue, states=states, count=0)


def sync_assert_not_pushed(
    chancy: Chancy,
    func: str | Callable[..., Any] | None = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    states: Iterable[QueuedJob.State | str] | None = None,
) -> None:
    """Sync twin of :func:`assert_not_pushed`."""
    sync_assert_pushed(chancy, func, kwargs=kwargs, queue=queue, states=states, count=0)


# -- inline mode --------------------------------------------------------------------------


@contextlib.contextmanager
def inline(chancy: Chancy) -> Iterator[Chancy]:
    """Within the block, ``push``, ``sync_push`` and ``push_many`` run the pushed job's
    queue at once with :func:`run_pending` (in the pushing coroutine or thread).

    Limits: pushes on your own connection (``push_ex`` and friends) are not run, since
    their transaction has not committed yet; jobs scheduled for later stay pending; the
    job runs before ``push`` returns, so a job that pushes itself recurses.
    """
    original_push = chancy.push
    original_sync_push = chancy.sync_push
    original_push_many = chancy.push_many

    async def push(queue_or_job: str | Job, job: Job | None = None, /) -> Reference:
        ref = await original_push(queue_or_job, job)  # type: ignore[arg-type]
        await run_pending(chancy, _queue_of(queue_or_job, job))
        return ref

    def sync_push(queue_or_job: str | Job, job: Job | None = None, /) -> Reference:
        ref = original_sync_push(queue_or_job, job)
        sync_run_pending(chancy, _queue_of(queue_or_job, job))
        return ref

    async def push_many(jobs: Iterable[Job], *, batch_size: int = 1000) -> AsyncIterator[Any]:
        jobs = list(jobs)
        async for refs in original_push_many(jobs, batch_size=batch_size):
            for queue in sorted({job.queue for job in jobs}):
                await run_pending(chancy, queue)
            yield refs

    patched = {"push": push, "sync_push": sync_push, "push_many": push_many}
    for name, replacement in patched.items():
        setattr(chancy, name, replacement)
    try:
        yield chancy
    finally:
        for name in patched:
            with contextlib.suppress(AttributeError):
                delattr(chancy, name)


def _queue_of(queue_or_job: str | Job, job: Job | None) -> str:
    if isinstance(queue_or_job, str):
        return queue_or_job
    return queue_or_job.queue


# -- pytest plugin ------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "chancy_dsn",
        "PostgreSQL server for the chancy_dsn fixture (env CHANCY_TEST_DSN wins)",
        default="postgresql://localhost/postgres",
    )


@pytest.fixture(scope="session")
def chancy_base_dsn(pytestconfig: pytest.Config) -> str:
    """The server the ``chancy_dsn`` fixture creates schemas on: ``CHANCY_TEST_DSN``, else
    the ``chancy_dsn`` ini option. Override this fixture to choose another way."""
    return os.environ.get("CHANCY_TEST_DSN") or str(pytestconfig.getini("chancy_dsn"))


@pytest.fixture
def chancy_dsn(chancy_base_dsn: str) -> Iterator[str]:
    """A DSN whose connections see only a fresh schema (dropped after the test)."""
    schema = f"chancy_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(chancy_base_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    params = conninfo_to_dict(chancy_base_dsn)
    params["options"] = f"{params.get('options') or ''} -c search_path={schema}".strip()
    try:
        yield make_conninfo("", **params)
    finally:
        with psycopg.connect(chancy_base_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{schema}%",),
            )
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def chancy_app(chancy_dsn: str) -> Iterator[Chancy]:
    """A migrated :class:`~chancy.Chancy` on ``chancy_dsn`` with its sync pool open; use
    ``async with chancy_app:`` in async tests to open the async pool too."""
    app = Chancy(chancy_dsn)
    with app:
        app.sync_migrate()
        yield app
