"""A job that takes a connection does its database work and commits its own completion in
one transaction: the work happens exactly once, or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg import sql

from chancy import Chancy, Job, Queue, QueuedJob, Reference
from tests.test_worker import poll, serving

ASYNC, THREADED = Chancy.Executor.Async, Chancy.Executor.Threaded
OK = {ASYNC: "tests.jobs_jobs.insert_order", THREADED: "tests.jobs_jobs.insert_order_sync"}
FAILS = {
    ASYNC: "tests.jobs_jobs.insert_order_then_fail",
    THREADED: "tests.jobs_jobs.insert_order_sync_then_fail",
}
GATED = {
    ASYNC: "tests.jobs_jobs.insert_order_gated",
    THREADED: "tests.jobs_jobs.insert_order_sync_gated",
}


async def orders(app: Chancy) -> list[int]:
    async with app.pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM orders ORDER BY id")
        return [row[0] for row in await cur.fetchall()]


@pytest.fixture
async def app(chancy: Chancy) -> Chancy:
    async with chancy.pool.connection() as conn:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    return chancy


@pytest.mark.parametrize("executor", [ASYNC, THREADED])
async def test_work_and_completion_commit_together(app: Chancy, executor: str) -> None:
    await app.declare(Queue("q", executor=executor, concurrency=4))
    async with serving(app) as worker:
        ok = [
            await app.push(Job(func=OK[executor], queue="q", kwargs={"order_id": i}))
            for i in range(1, 4)
        ]
        bad = await app.push(
            Job(func=FAILS[executor], queue="q", kwargs={"order_id": 99}, max_attempts=2)
        )
        jobs = await app.wait_for_jobs([*ok, bad], timeout=30)
        # The committed outcomes were accounted for: no slot stays taken.
        await poll(lambda: not worker._claimed)
    states = {job.id: (job.state, job.result) for job in jobs}
    assert [states[r] for r in ok] == [("succeeded", i) for i in range(1, 4)]
    assert states[bad] == ("failed", None)
    # The failing job's insert rolled back on both attempts (a committed one would have
    # made the second attempt hit the primary key instead).
    failed = next(job for job in jobs if job.id == bad)
    assert all("after the insert" in e["traceback"] for e in failed.errors)
    assert await orders(app) == [1, 2, 3]


@pytest.mark.parametrize("executor", [ASYNC, THREADED])
async def test_lost_claim_rolls_the_work_back(app: Chancy, executor: str, tmp_path: Path) -> None:
    await app.declare(Queue("q", executor=executor))
    gate = tmp_path / "gate"
    async with serving(app) as worker:
        ref = await app.push(
            Job(func=GATED[executor], queue="q", kwargs={"order_id": 7, "gate": str(gate)})
        )

        async def running() -> bool:
            job = await app.get_job(ref)
            return job is not None and job.state == "running"

        await poll(running)
        # Another worker took the job over (as recovery would after a lost heartbeat).
        await steal(app, ref)
        gate.touch()
        # The attempt is over once its (rejected) outcome was written: by then its
        # transaction has ended, so a committed insert would be visible.
        await poll(lambda: not worker._claimed)
    job = await app.get_job(ref)
    assert job is not None and job.state == "running" and job.taken_by == "thief"
    assert await orders(app) == []


async def steal(app: Chancy, ref: Reference) -> None:
    async with app.pool.connection() as conn:
        await conn.execute(
            sql.SQL("UPDATE {} SET taken_by = 'thief' WHERE id = %s").format(
                app.store.table("jobs")
            ),
            (ref.uuid,),
        )


@pytest.mark.parametrize(
    "executor,func",
    [
        (Chancy.Executor.Process, "tests.jobs_jobs.insert_order_sync"),
        (ASYNC, "tests.jobs_jobs.insert_order_sync"),
        (THREADED, "tests.jobs_jobs.insert_order"),
    ],
)
async def test_executors_that_cannot_give_a_connection_fail_clearly(
    app: Chancy, executor: str, func: str
) -> None:
    await app.declare(Queue("q", executor=executor))
    async with serving(app):
        ref = await app.push(Job(func=func, queue="q", kwargs={"order_id": 1}))
        job = await app.wait_for_job(ref, timeout=30)
    assert isinstance(job, QueuedJob) and job.state == "failed"
    assert "UnsupportedExecutorError" in job.errors[0]["traceback"]
    assert "asks for a psycopg." in job.errors[0]["traceback"]
    assert await orders(app) == []


async def test_oversize_result_rolls_back_and_is_not_retried(dsn: str) -> None:
    async with Chancy(dsn, max_result_size=1000) as app:
        await app.migrate()
        async with app.pool.connection() as conn:
            await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        await app.declare(Queue("q", executor=ASYNC))
        async with serving(app):
            ref = await app.push(
                Job(
                    func="tests.jobs_jobs.insert_order_big_result",
                    queue="q",
                    kwargs={"order_id": 5},
                    max_attempts=3,
                )
            )
            job = await app.wait_for_job(ref, timeout=30)
        assert job is not None and job.state == "failed" and job.attempts == 1
        assert "ResultTooLargeError" in job.errors[0]["traceback"]
        assert await orders(app) == []
