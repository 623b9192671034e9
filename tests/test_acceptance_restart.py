"""Acceptance: PostgreSQL restarts and outages (DESIGN §3.7 self-healing worker).

These tests stop and restart a server, so they never touch the machine's shared one: a
throwaway cluster (tests/pgcluster.py) is started for the session and every test gets a
database of its own on it. Restarts run in a thread so that the worker's event loop keeps
running through them, as it would in production.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import PoolTimeout

from chancy import Chancy, Job, Queue, QueuedJob, Reference, Worker
from tests.pgcluster import PgCluster, pg_cluster

MODES = ["fast", "immediate"]
#: The worker loops and the pool reconnect with back-off; this bounds their recovery.
RECOVERY_DEADLINE = 10.0
#: A queue polled this rarely can only be served promptly through LISTEN/NOTIFY.
LONG_POLL = 30.0


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    try:
        with pg_cluster() as started:
            yield started
    except RuntimeError as exc:
        if "no initdb found" in str(exc):
            pytest.fail(str(exc), pytrace=False)
        raise


@pytest.fixture
def db_dsn(cluster: PgCluster) -> Iterator[str]:
    """A fresh database on the throwaway cluster, dropped after the test."""
    cluster.wait_ready()
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield cluster.dsn(name)
    if not cluster.is_running():
        cluster.start()
    cluster.wait_ready()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def app(db_dsn: str) -> AsyncIterator[Chancy]:
    chancy = Chancy(db_dsn, poll_reconnect_timeout=5)
    async with chancy:
        await chancy.migrate()
        await chancy.declare(Queue("work", executor=Chancy.Executor.Async, polling_interval=0.2))
        await chancy.declare(
            Queue("slow", executor=Chancy.Executor.Async, polling_interval=LONG_POLL)
        )
        yield chancy


def worker_for(app: Chancy) -> Worker:
    return Worker(
        app,
        register_signal_handlers=False,
        heartbeat_poll_interval=0.2,
        heartbeat_timeout=5,
        queue_change_poll_interval=0.2,
    )


async def eventually(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome = check()
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
        except psycopg.OperationalError:
            outcome = None
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def query(dsn: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own (not Chancy's pool)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall()


async def push_eventually(app: Chancy, job: Job) -> tuple[Reference, int]:
    """Push, retrying failures for a while; returns the reference and the failures seen.

    After a restart the pool may hand out connections the server already closed; that is
    covered by :func:`test_first_push_after_restart_succeeds`, not here."""
    failures = 0
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while True:
        try:
            return await app.push(job), failures
        except (psycopg.OperationalError, PoolTimeout):
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def assert_alive(worker: Worker) -> None:
    """The worker and every one of its loops are still running (none died for good)."""
    assert worker._start_task is not None and not worker._start_task.done()
    assert not worker.stopping.is_set()
    dead = [t.get_name() for t in [*worker._tasks, *worker._runners.values()] if t.done()]
    assert not dead, f"worker loops ended: {dead}"
    assert set(worker._runners) == {"work", "slow"}


async def listening(dsn: str, app: Chancy) -> bool:
    """True when some session on this database is LISTENing on Chancy's channel."""
    rows = await query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query = %s",
        f'LISTEN "{app.store.channel}"',
    )
    return bool(rows[0][0])


async def all_running(app: Chancy, refs: list[Reference]) -> bool:
    jobs = await app.get_jobs(refs)
    return len(jobs) == len(refs) and all(j.state == "running" for j in jobs)


async def finished(app: Chancy, refs: list[Reference], timeout: float) -> list[QueuedJob]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await app.wait_for_jobs(
                refs, interval=0.05, timeout=max(0.1, deadline - time.monotonic())
            )
        except (psycopg.OperationalError, PoolTimeout):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def listen_then_pickup(db_dsn: str, app: Chancy, since: float) -> tuple[float, float]:
    """Wait for the LISTEN session to be back; then time a push to the 30 s queue until
    its job is done. Returns (seconds since ``since`` until LISTEN, pickup seconds)."""
    await eventually(lambda: listening(db_dsn, app), timeout=RECOVERY_DEADLINE, what="LISTEN")
    listen_back = time.monotonic() - since
    pushed_at = time.monotonic()
    ref, _ = await push_eventually(app, Job(func="tests.jobs.noop", queue="slow"))
    [job] = await finished(app, [ref], 10)
    pickup = time.monotonic() - pushed_at
    assert job.state == "succeeded", job
    assert pickup < 5, f"pickup took {pickup:.2f} s: NOTIFY not delivered after the restart"
    return listen_back, pickup


@pytest.mark.parametrize("mode", MODES)
async def test_worker_survives_restart(
    cluster: PgCluster, db_dsn: str, app: Chancy, mode: str
) -> None:
    async with worker_for(app) as worker:
        warm, _ = await push_eventually(app, Job(func="tests.jobs.noop", queue="work"))
        await finished(app, [warm], RECOVERY_DEADLINE)
        await eventually(lambda: listening(db_dsn, app), timeout=5, what="LISTEN at start")
        before = [warm]

        # 1. Restart while idle: the worker lives on, serves new pushes, LISTENs again.
        await asyncio.to_thread(cluster.restart, mode)
        restarted_at = time.monotonic()
        assert_alive(worker)
        ref, failed_pushes = await push_eventually(app, Job(func="tests.jobs.noop", queue="work"))
        [job] = await finished(app, [ref], RECOVERY_DEADLINE)
        assert job.state == "succeeded", job
        recovery = time.monotonic() - restarted_at
        before.append(ref)
        listen_back, pickup = await listen_then_pickup(db_dsn, app, restarted_at)

        # 2. Restart while jobs run (and more wait): interrupted attempts may be retried.
        sleeper = Job(
            func="tests.jobs.async_sleep", queue="work", kwargs={"seconds": 1.0}, max_attempts=3
        )
        running = [(await push_eventually(app, sleeper))[0] for _ in range(5)]
        later = Job(func="tests.jobs.noop", queue="work", max_attempts=3)
        waiting = [(await push_eventually(app, later))[0] for _ in range(5)]
        await eventually(lambda: all_running(app, running), timeout=5, what="sleepers running")
        before += running + waiting
        await asyncio.to_thread(cluster.restart, mode)
        busy_restarted_at = time.monotonic()
        assert_alive(worker)
        after, _ = await push_eventually(app, Job(func="tests.jobs.noop", queue="work"))
        jobs = await finished(app, [*before, after], RECOVERY_DEADLINE + 5)
        busy_recovery = time.monotonic() - busy_restarted_at
        assert {j.id for j in jobs} == {*before, after}, "a pushed job disappeared"
        assert {j.id: j.state for j in jobs} == {r: "succeeded" for r in [*before, after]}
        busy_listen_back, busy_pickup = await listen_then_pickup(db_dsn, app, busy_restarted_at)
        assert_alive(worker)
    print(
        f"\n[{mode}] idle: first job done {recovery:.2f} s after restart "
        f"({failed_pushes} push(es) failed first), LISTEN back {listen_back:.2f} s, "
        f"30 s-queue pickup {pickup * 1000:.0f} ms; busy: all jobs done {busy_recovery:.2f} s, "
        f"LISTEN back {busy_listen_back:.2f} s, pickup {busy_pickup * 1000:.0f} ms"
    )


@pytest.mark.parametrize("api", ["async", "sync"])
@pytest.mark.parametrize("mode", MODES)
async def test_first_push_after_restart_succeeds(
    cluster: PgCluster, app: Chancy, mode: str, api: str
) -> None:
    """Once the server is back, pushing works at once: no error for the caller."""
    job = Job(func="tests.jobs.noop", queue="work")
    with app:
        # Several idle connections in the pool, as a busy application has.
        async def borrow() -> None:
            async with app.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(borrow() for _ in range(3)))
        await asyncio.to_thread(lambda: [app.sync_push(job) for _ in range(3)])
        await asyncio.to_thread(cluster.restart, mode)
        refs = []
        for _ in range(app.max_connection_pool_size + 1):
            if api == "async":
                refs.append(await app.push(job))
            else:
                refs.append(await asyncio.to_thread(app.sync_push, job))
        assert len(await app.get_jobs(refs)) == len(refs)


async def test_push_during_outage_fails_then_recovers(cluster: PgCluster, app: Chancy) -> None:
    """While the server is down a push raises a connection error (never hangs); once it
    is back the same Chancy pushes again."""
    job = Job(func="tests.jobs.noop", queue="work")
    first = await app.push(job)
    default_wait = app.pool.timeout
    assert 0 < default_wait <= 60, "a push could wait for a connection forever"
    # Chancy has no setting for the pool's wait for a connection (psycopg_pool's
    # `timeout`, 30 s by default); shorten it so that the test stays short.
    app.pool.timeout = 2.0
    errors: list[Exception] = []
    await asyncio.to_thread(cluster.stop, "fast")
    try:
        # Dead connections still in the pool fail at once; then the pool waits for a new
        # connection, which cannot be made, and gives up after its timeout.
        for _ in range(app.max_connection_pool_size + 1):
            started = time.monotonic()
            with pytest.raises((psycopg.OperationalError, PoolTimeout)) as caught:
                await asyncio.wait_for(app.push(job), timeout=app.pool.timeout + 10)
            assert time.monotonic() - started < app.pool.timeout + 1
            errors.append(caught.value)
            if isinstance(caught.value, PoolTimeout):
                break
        assert isinstance(errors[-1], PoolTimeout), errors
    finally:
        await asyncio.to_thread(cluster.start)
    app.pool.timeout = default_wait
    back_at = time.monotonic()
    second = await app.push(job)
    back_after = time.monotonic() - back_at
    # The pool retries connecting with back-off, giving up after poll_reconnect_timeout.
    assert back_after < app.poll_reconnect_timeout + 2
    assert {j.id for j in await app.get_jobs([first, second])} == {first, second}
    print(
        f"\noutage: {len(errors)} push(es) failed "
        f"({', '.join(type(e).__name__ for e in errors)}); "
        f"first push after the server came back took {back_after:.2f} s"
    )
