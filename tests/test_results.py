"""Job results: stored with a size cap, read with get_result, awaited with wait_for_job(s)
that wake on the completion NOTIFY (and still poll without it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from chancy import Chancy, Job, Queue, QueuedJob
from chancy.app import _CompletionListener
from chancy.errors import (
    ConfigurationError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
)
from chancy.store import Outcome, arun
from tests.test_worker import ALL_EXECUTORS, serving


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_get_result_for_each_state(chancy: Chancy, executor: str) -> None:
    await chancy.declare(Queue("q", executor=executor, concurrency=2))
    ok = await chancy.push(Job(func="tests.jobs.echo", queue="q", kwargs={"n": [1, "two"]}))
    bad = await chancy.push(Job(func="tests.jobs.fail", queue="q", kwargs={"message": "no"}))
    with pytest.raises(JobNotFinishedError, match="pending"):
        await chancy.get_result(ok)
    async with serving(chancy):
        assert await chancy.get_result(ok, wait=True, timeout=20) == {"n": [1, "two"]}
        with pytest.raises(JobFailedError, match="ValueError: no") as failed:
            await chancy.get_result(bad, wait=True, timeout=20)
    assert failed.value.job.state == QueuedJob.State.FAILED
    with pytest.raises(JobNotFoundError):
        await chancy.get_result("0190c3d2-0000-7000-8000-000000000000")


async def test_oversize_result_fails_the_job_without_retrying(dsn: str) -> None:
    async with Chancy(dsn, max_result_size=100) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        small = await app.push(
            Job(func="tests.jobs_jobs.sized_result", queue="q", kwargs={"size": 50})
        )
        big = await app.push(
            Job(
                func="tests.jobs_jobs.sized_result", queue="q", kwargs={"size": 500}, max_attempts=3
            )
        )
        async with serving(app):
            assert await app.get_result(small, wait=True, timeout=20) == "x" * 50
            with pytest.raises(JobFailedError, match="ResultTooLargeError"):
                await app.get_result(big, wait=True, timeout=20)
        job = await app.get_job(big)
    assert job is not None and job.attempts == 1 and job.result is None
    assert "limit is 100" in job.errors[0]["traceback"]


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_max_result_size_is_validated(size: object) -> None:
    with pytest.raises(ConfigurationError, match="max_result_size"):
        Chancy("dbname=test", max_result_size=size)  # type: ignore[arg-type]


async def test_one_notification_per_completed_batch_without_job_data(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    refs = [
        await chancy.push(Job(func="tests.jobs.echo", queue="q", kwargs={"secret": i}))
        for i in range(3)
    ]
    async with chancy.pool.connection() as conn:
        jobs = await arun(conn, chancy.store.fetch_jobs("q", "w1", 10))
    listener = await psycopg.AsyncConnection.connect(chancy.dsn, autocommit=True)
    async with listener:
        channel = sql.Identifier(chancy.store.done_channel)
        await listener.execute(sql.SQL("LISTEN {}").format(channel))
        outcomes = [Outcome(job, "succeeded", result={"secret": 1}) for job in jobs]
        async with chancy.pool.connection() as conn:
            held = await arun(conn, chancy.store.complete_jobs("w1", outcomes))
            # A batch whose claims are gone announces nothing.
            assert await arun(conn, chancy.store.complete_jobs("w1", outcomes)) == set()
        assert held == set(refs)
        # Channels are per database: other schemas' workers may announce on it too.
        ours = {str(r) for r in refs}
        payloads = [
            n.payload
            async for n in listener.notifies(timeout=1)
            if ours & set(json.loads(n.payload).get("j", []))
        ]
    assert len(payloads) == 1
    event = json.loads(payloads[0])
    assert event["e"] == "done" and sorted(event["j"]) == sorted(str(r) for r in refs)
    assert "secret" not in payloads[0]


async def test_waiter_is_woken_by_the_completion_notification(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    other = await chancy.push(Job(func="tests.jobs.noop", queue="q", priority=-1))
    listener = _CompletionListener(chancy)
    mine, unrelated = asyncio.Event(), asyncio.Event()
    listener.add(mine, {str(ref)})
    listener.add(unrelated, {"0190c3d2-0000-7000-8000-000000000000"})
    try:
        assert await listener.start(10)
        async with serving(chancy, worker_id="w"):
            # Nothing polls here: only the notification can set the event.
            await asyncio.wait_for(mine.wait(), timeout=20)
            await chancy.wait_for_job(other, timeout=20)
        assert not unrelated.is_set()
    finally:
        await listener.close()


@pytest.mark.parametrize("notifications", [True, False])
async def test_wait_for_jobs_returns_results_and_deleted_jobs(
    dsn: str, tmp_path: Path, notifications: bool
) -> None:
    async with Chancy(dsn, notifications=notifications) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        gate = tmp_path / "gate"
        refs = [
            await app.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": i, "b": 1}))
            for i in range(3)
        ]
        doomed = await app.push(
            Job(func="tests.jobs_jobs.async_wait_for_file", queue="q", kwargs={"path": str(gate)})
        )
        async with serving(app):
            waiter = asyncio.create_task(app.wait_for_jobs([*refs, doomed], timeout=30))
            await app.wait_for_jobs(refs, timeout=20)
            async with app.pool.connection() as conn:
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE id = %s").format(app.store.table("jobs")),
                    (doomed.uuid,),
                )
            jobs = await waiter
            gate.touch()
    assert sorted(j.result for j in jobs) == [1, 2, 3]
    assert {j.id for j in jobs} == set(refs)


@pytest.mark.parametrize("notifications", [True, False])
def test_sync_wait_and_result(dsn: str, notifications: bool) -> None:
    with Chancy(dsn, notifications=notifications) as app:
        app.sync_migrate()
        app.sync_declare(Queue("q", executor=Chancy.Executor.Async))
        ref = app.sync_push(Job(func="tests.jobs.add", queue="q", kwargs={"a": 2, "b": 5}))
        with pytest.raises(TimeoutError):
            app.sync_wait_for_job(ref, timeout=0.2)
        with pytest.raises(JobNotFinishedError):
            app.sync_get_result(ref)

        async def serve() -> QueuedJob | None:
            async with Chancy(dsn, notifications=notifications) as worker_app:
                async with serving(worker_app):
                    return await asyncio.to_thread(app.sync_wait_for_job, ref, timeout=20)

        job = asyncio.run(serve())
        assert job is not None and job.result == 7
        assert app.sync_get_result(ref) == 7
        assert app.sync_get_result(ref, wait=True, timeout=5) == 7


async def test_progress_of_a_finished_job_and_results_survive_get_jobs(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    ref = await chancy.push(
        Job(func="tests.jobs_jobs.progress_storm", queue="q", kwargs={"count": 3})
    )
    async with serving(chancy):
        job = await chancy.wait_for_job(ref, timeout=20)
    assert job is not None and job.result == 3
    assert job.progress == {"percent": 100.0, "message": "step 3"}
    assert job.to_dict()["progress"] == job.progress
