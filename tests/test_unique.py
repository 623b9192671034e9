"""Unique keys under concurrency: one live job per key, whoever pushes at the same time,
in single pushes and in bulk, with no deadlocks; callers learn new vs deduplicated."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import psycopg
import pytest

from chancy import Chancy, Job, Queue, Reference
from chancy.store import PushResult

from .test_limits import workers

LIVE = ("pending", "running", "retrying")


@pytest.fixture
async def app(chancy: Chancy) -> Chancy:
    await chancy.declare(Queue("default"))
    return chancy


def sync_app(dsn: str) -> Chancy:
    app = Chancy(dsn)
    with app:
        app.sync_migrate()
        app.sync_declare(Queue("default"))
    return app


async def live_jobs_by_key(app: Chancy) -> dict[str, list[Reference]]:
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT unique_key, id FROM chancy_jobs WHERE unique_key IS NOT NULL "
            "AND state = ANY(%s) ORDER BY id",
            (list(LIVE),),
        )
        rows = await cur.fetchall()
    found: dict[str, list[Reference]] = {}
    for key, job_id in rows:
        found.setdefault(key, []).append(Reference(job_id))
    return found


async def test_concurrent_tasks_pushing_one_key_insert_exactly_one(app: Chancy) -> None:
    job = Job(func="tests.jobs.noop", unique_key="once")
    # Each task on its own connection, released together.
    go = asyncio.Event()

    async def push_one(n: int) -> PushResult:
        async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
            await go.wait()
            return (await app.push_detailed_ex(conn, [job.with_kwargs(n=n)]))[0]

    tasks = [asyncio.ensure_future(push_one(n)) for n in range(24)]
    await asyncio.sleep(0)  # let every task open its connection before the race starts
    go.set()
    results = await asyncio.gather(*tasks)
    assert sum(r.inserted for r in results) == 1
    assert len({r.reference for r in results}) == 1
    assert await live_jobs_by_key(app) == {"once": [results[0].reference]}
    # push() keeps returning the one reference.
    assert await app.push(job) == results[0].reference


def test_concurrent_threads_pushing_one_key_insert_exactly_one(dsn: str) -> None:
    app = sync_app(dsn)
    barrier = threading.Barrier(12)
    results: list[PushResult] = []
    errors: list[BaseException] = []

    def push_one(n: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait(timeout=30)
                job = Job(func="tests.jobs.noop", unique_key="threaded", kwargs={"n": n})
                results.extend(app.sync_push_detailed_ex(conn, [job]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=push_one, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 12
    assert sum(r.inserted for r in results) == 1
    assert len({r.reference for r in results}) == 1
    with app:
        stored = app.sync_push_detailed([Job(func="tests.jobs.noop", unique_key="threaded")])
    assert stored == [PushResult(results[0].reference, False)]


async def test_concurrent_bulk_pushes_with_shared_keys_do_not_deadlock(app: Chancy) -> None:
    keys = [f"k{i}" for i in range(150)]
    rng = random.Random(7)

    def batch() -> list[Job]:
        # Overlapping keys in a different order each time, with duplicates inside.
        chosen = rng.sample(keys, 100) + rng.sample(keys, 20)
        rng.shuffle(chosen)
        return [Job(func="tests.jobs.noop", unique_key=k) for k in chosen]

    batches = [batch() for _ in range(16)]

    async def push(jobs: list[Job]) -> list[PushResult]:
        async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
            async with conn.transaction():
                return await app.push_detailed_ex(conn, jobs)

    results = await asyncio.wait_for(asyncio.gather(*(push(b) for b in batches)), timeout=60)
    live = await live_jobs_by_key(app)
    pushed_keys = {j.unique_key for b in batches for j in b}
    assert set(live) == pushed_keys
    assert all(len(refs) == 1 for refs in live.values())
    assert sum(r.inserted for rs in results for r in rs) == len(pushed_keys)
    for jobs, outcome in zip(batches, results, strict=True):
        assert len(outcome) == len(jobs)
        seen: set[str] = set()
        for job, result in zip(jobs, outcome, strict=True):
            assert job.unique_key is not None
            assert result.reference == live[job.unique_key][0]
            # Within one batch only the first of a key can be the new one.
            assert not (result.inserted and job.unique_key in seen)
            seen.add(job.unique_key)


async def test_a_key_held_by_an_open_transaction_waits_for_it(app: Chancy) -> None:
    for commit in (False, True):
        key = f"txn-{commit}"
        job = Job(func="tests.jobs.noop", unique_key=key)
        async with await psycopg.AsyncConnection.connect(app.dsn) as holder:
            first = (await app.push_detailed_ex(holder, [job]))[0]
            assert first.inserted
            # The second push blocks on the uncommitted row of the first.
            second = asyncio.ensure_future(app.push_detailed([job]))
            await _until_blocked(app)
            assert not second.done()
            await (holder.commit() if commit else holder.rollback())
        (result,) = await asyncio.wait_for(second, timeout=30)
        if commit:
            assert result == PushResult(first.reference, False)
        else:
            assert result.inserted and result.reference != first.reference
        assert len((await live_jobs_by_key(app))[key]) == 1


async def _until_blocked(app: Chancy) -> None:
    """Wait until some session of this schema waits on a lock."""
    for _ in range(1500):
        async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s",
                (f"%{app.store.prefix}jobs%",),
            )
            row = await cur.fetchone()
        if row and row[0]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the second push never blocked")


async def test_key_is_exclusive_while_running_and_free_once_finished(app: Chancy) -> None:
    await app.declare(Queue("u", executor=Chancy.Executor.Async, concurrency=4))
    job = Job(func="tests.jobs.async_sleep", queue="u", kwargs={"seconds": 1}, unique_key="u1")
    first = (await app.push_detailed([job]))[0]
    async with workers(app, 2):
        await app.wait_for_jobs([first.reference], states=["running"], timeout=20)
        # Several tasks push the same key while it runs: all of them land on it.
        again = await asyncio.gather(*(app.push_detailed([job]) for _ in range(8)))
        assert {r[0] for r in again} == {PushResult(first.reference, False)}
        await app.wait_for_jobs([first.reference], timeout=20)
        after = (await app.push_detailed([job.with_kwargs(seconds=0)]))[0]
        assert after.inserted and after.reference != first.reference
        done = await app.wait_for_jobs([after.reference], timeout=20)
    assert [j.state for j in done] == ["succeeded"]


@pytest.mark.parametrize("rollback", [False, True])
def test_sync_push_detailed_ex_follows_the_callers_transaction(dsn: str, rollback: bool) -> None:
    app = sync_app(dsn)
    with psycopg.connect(dsn) as conn:
        first = app.sync_push_detailed_ex(conn, [Job(func="tests.jobs.noop", unique_key="s")])
        again = app.sync_push_detailed_ex(conn, [Job(func="tests.jobs.noop", unique_key="s")])
        assert first[0].inserted and again == [PushResult(first[0].reference, False)]
        if rollback:
            conn.rollback()
    with app:
        stored: Any = app.sync_get_job(first[0].reference)
    assert (stored is None) == rollback
