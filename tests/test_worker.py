"""The worker loop and executors against a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from chancy import Chancy, Job, Limit, Queue, QueuedJob, Worker
from chancy.store import Outcome, arun

ALL_EXECUTORS = [Chancy.Executor.Async, Chancy.Executor.Threaded, Chancy.Executor.Process]


@asynccontextmanager
async def serving(app: Chancy, **kwargs: object) -> AsyncIterator[Worker]:
    settings: dict[str, object] = {
        "register_signal_handlers": False,
        "queue_change_poll_interval": 0.2,
        "heartbeat_poll_interval": 0.2,
        "heartbeat_timeout": 5,
        "shutdown_timeout": 5,
    }
    settings.update(kwargs)
    async with Worker(app, **settings) as worker:  # type: ignore[arg-type]
        yield worker


async def poll(check: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def db_now(app: Chancy) -> dt.datetime:
    async with app.pool.connection() as conn:
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_results_errors_and_job_injection(chancy: Chancy, executor: str) -> None:
    await chancy.declare(Queue("q", executor=executor, concurrency=2))
    async with serving(chancy):
        ok = await chancy.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": 2, "b": 3}))
        bad = await chancy.push(Job(func="tests.jobs.fail", queue="q", max_attempts=2))
        missing = await chancy.push(Job(func="tests.jobs.nothing_here", queue="q"))
        injected = await chancy.push(Job(func="tests.jobs.with_job", queue="q"))
        ok_job, bad_job, missing_job, injected_job = [
            await chancy.wait_for_job(r, timeout=20) for r in (ok, bad, missing, injected)
        ]
    assert ok_job is not None and ok_job.state == "succeeded" and ok_job.result == 5
    assert ok_job.completed_at is not None and ok_job.started_at is not None
    assert bad_job is not None and bad_job.state == "failed" and bad_job.attempts == 2
    assert [e["attempt"] for e in bad_job.errors] == [1, 2]
    assert "ValueError: boom" in bad_job.errors[-1]["traceback"]
    assert missing_job is not None and missing_job.state == "failed"
    assert "nothing_here" in missing_job.errors[0]["traceback"]
    assert injected_job is not None and injected_job.state == "succeeded"
    assert injected_job.result == {"id": str(injected), "attempts": 1}
    assert injected_job.meta == {"seen": 1}


async def test_priority_then_fifo(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, concurrency=1))
    plan = [0, 5, 0, -3, 5, 10, 0]
    refs = [await chancy.push(Job(func="tests.jobs.noop", queue="q", priority=p)) for p in plan]
    async with serving(chancy):
        jobs = await chancy.wait_for_jobs(refs, timeout=20)
    order = [j.id for j in sorted(jobs, key=lambda j: j.started_at)]  # type: ignore[arg-type, return-value]
    expected = [
        r
        for _, _, r in sorted(((-p, i, r) for i, (p, r) in enumerate(zip(plan, refs, strict=True))))
    ]
    assert order == expected


async def test_scheduled_jobs_wait_for_database_time(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
    when = await db_now(chancy) + dt.timedelta(seconds=1)
    later = await chancy.push(Job(func="tests.jobs.noop", queue="q", scheduled_at=when))
    now_ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    async with serving(chancy):
        done_now = await chancy.wait_for_job(now_ref, timeout=10)
        assert done_now is not None and done_now.state == "succeeded"
        pending = await chancy.get_job(later)
        assert pending is not None and pending.state == "pending"
        done_later = await chancy.wait_for_job(later, timeout=10)
    assert done_later is not None and done_later.started_at is not None
    assert done_later.started_at >= when


async def test_snooze_does_not_use_an_attempt(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded))
    async with serving(chancy):
        ref = await chancy.push(Job(func="tests.jobs.snooze_once", queue="q"))
        job = await chancy.wait_for_job(ref, timeout=10)
    assert job is not None and job.state == "succeeded" and job.result == "woke"
    assert job.attempts == 1 and job.meta == {"snoozed": True}


async def test_retries_until_success(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    async with serving(chancy):
        ref = await chancy.push(
            Job(func="tests.jobs.fail_until", queue="q", kwargs={"attempt": 3}, max_attempts=5)
        )
        job = await chancy.wait_for_job(ref, timeout=10)
    assert job is not None and job.state == "succeeded" and job.result == 3
    assert len(job.errors) == 2


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_cancel_pending_and_running(chancy: Chancy, executor: str) -> None:
    await chancy.declare(Queue("q", executor=executor, concurrency=1))
    pending = await chancy.push(
        Job(
            func="tests.jobs.noop",
            queue="q",
            scheduled_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )
    )
    assert await chancy.cancel_job(pending)
    assert (await chancy.get_job(pending)).state == "cancelled"  # type: ignore[union-attr]
    assert not await chancy.cancel_job(pending)
    async with serving(chancy, shutdown_timeout=1):
        func = "tests.jobs.async_sleep" if executor == Chancy.Executor.Async else "tests.jobs.sleep"
        long = await chancy.push(Job(func=func, queue="q", kwargs={"seconds": 60}, max_attempts=3))
        await chancy.wait_for_job(long, states=["running"], timeout=10)
        assert await chancy.cancel_job(long)
        # The slot is freed: the next job runs although the cancelled one would still sleep.
        nxt = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        done = await chancy.wait_for_job(nxt, timeout=30)
        assert done is not None and done.state == "succeeded"
    final = await chancy.get_job(long)
    assert final is not None and final.state == "cancelled" and final.attempts == 1


async def test_cancel_without_notifications_uses_heartbeat_poll(dsn: str) -> None:
    async with Chancy(dsn, notifications=False) as app:
        await app.migrate()
        await app.declare(
            Queue("q", executor=Chancy.Executor.Async, concurrency=1, polling_interval=0.1)
        )
        async with serving(app) as worker:
            ref = await app.push(
                Job(func="tests.jobs.async_sleep", queue="q", kwargs={"seconds": 30})
            )
            await app.wait_for_job(ref, states=["running"], timeout=10)
            assert await app.cancel_job(ref)
            await poll(lambda: not worker.executors["q"].running, timeout=5)
        job = await app.get_job(ref)
    assert job is not None and job.state == "cancelled"


@pytest.mark.parametrize(
    ("executor", "func"),
    [
        (Chancy.Executor.Async, "tests.jobs.async_sleep"),
        (Chancy.Executor.Process, "tests.jobs.sleep"),
        (Chancy.Executor.Process, "tests.jobs.busy_loop"),
        (Chancy.Executor.Threaded, "tests.jobs.sleep"),
    ],
)
async def test_time_limits(chancy: Chancy, executor: str, func: str) -> None:
    await chancy.declare(Queue("q", executor=executor, concurrency=1))
    async with serving(chancy):
        started = time.monotonic()
        ref = await chancy.push(
            Job(func=func, queue="q", kwargs={"seconds": 5}, limits=[Limit(Limit.Type.TIME, 0.3)])
        )
        follower = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        job = await chancy.wait_for_job(ref, timeout=10)
        elapsed = time.monotonic() - started
        after = await chancy.wait_for_job(follower, timeout=10)
    assert job is not None and job.state == "failed"
    assert "Timeout" in job.errors[-1]["traceback"]
    assert elapsed < 4
    assert after is not None and after.state == "succeeded"


async def test_memory_limit_in_process_executor(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    async with serving(chancy):
        big = await chancy.push(
            Job(
                func="tests.jobs.allocate",
                queue="q",
                kwargs={"megabytes": 2048},
                limits=[Limit(Limit.Type.MEMORY, 1024 * 1024 * 1024)],
            )
        )
        small = await chancy.push(
            Job(func="tests.jobs.allocate", queue="q", kwargs={"megabytes": 1})
        )
        big_job = await chancy.wait_for_job(big, timeout=20)
        small_job = await chancy.wait_for_job(small, timeout=20)
    assert big_job is not None and big_job.state == "failed"
    assert "MemoryError" in big_job.errors[-1]["traceback"]
    assert small_job is not None and small_job.state == "succeeded"


@pytest.mark.parametrize(
    "poison", ["tests.jobs.die", "tests.jobs.segfault", "tests.jobs.kill_self"]
)
async def test_dying_process_does_not_fail_its_siblings(chancy: Chancy, poison: str) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=3))
    async with serving(chancy):
        siblings = [
            await chancy.push(Job(func="tests.jobs.sleep", queue="q", kwargs={"seconds": 0.5}))
            for _ in range(2)
        ]
        await chancy.wait_for_jobs(siblings, states=["running"], timeout=15)
        bad = await chancy.push(Job(func=poison, queue="q", max_attempts=2))
        later = [await chancy.push(Job(func="tests.jobs.record_pid", queue="q")) for _ in range(4)]
        jobs = {j.id: j for j in await chancy.wait_for_jobs([*siblings, bad, *later], timeout=30)}
    assert jobs[bad].state == "failed" and jobs[bad].attempts == 2
    assert "WorkerDiedError" in jobs[bad].errors[-1]["traceback"]
    for ref in [*siblings, *later]:
        assert jobs[ref].state == "succeeded" and jobs[ref].attempts == 1


async def test_pause_resume_and_resume_at(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
    async with serving(chancy) as worker:
        await chancy.pause_queue("q")
        await poll(lambda: worker.queues["q"].state == "paused")
        ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        with pytest.raises(TimeoutError):
            await chancy.wait_for_job(ref, timeout=0.5)
        await chancy.resume_queue("q")
        assert (await chancy.wait_for_job(ref, timeout=5)).state == "succeeded"  # type: ignore[union-attr]
        resume_at = await db_now(chancy) + dt.timedelta(seconds=0.8)
        paused = await chancy.pause_queue("q", resume_at=resume_at)
        assert paused.state == "paused" and paused.resume_at == resume_at
        await poll(lambda: worker.queues["q"].state == "paused")
        ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        job = await chancy.wait_for_job(ref, timeout=10)
    assert job is not None and job.started_at is not None and job.started_at >= resume_at
    queue = await chancy.get_queue("q")
    assert queue is not None and queue.state == "active" and queue.resume_at is None


async def test_fetch_claims_nothing_from_a_paused_queue(chancy: Chancy) -> None:
    # A worker's copy of the queue can lag a pause; the fetch itself checks the state.
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    await chancy.pause_queue("q")
    async with chancy.pool.connection() as conn:
        assert await arun(conn, chancy.store.fetch_jobs("q", "w1", 10)) == []
    await chancy.resume_queue("q")
    async with chancy.pool.connection() as conn:
        jobs = await arun(conn, chancy.store.fetch_jobs("q", "w1", 10))
    assert [job.id for job in jobs] == [ref]


async def test_reconfigure_and_delete_queue_at_runtime(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, concurrency=1))
    async with serving(chancy) as worker:
        await poll(lambda: "q" in worker.executors)
        assert worker.executors["q"].concurrency == 1
        await chancy.declare(
            Queue("q", executor=Chancy.Executor.Threaded, concurrency=3), upsert=True
        )
        await poll(lambda: "q" in worker.executors and worker.executors["q"].concurrency == 3)
        assert type(worker.executors["q"]).__name__ == "ThreadedExecutor"
        ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        assert (await chancy.wait_for_job(ref, timeout=5)).state == "succeeded"  # type: ignore[union-attr]
        await chancy.declare(Queue("late", executor=Chancy.Executor.Async))
        await poll(lambda: "late" in worker.executors)
        assert await chancy.delete_queue("q")
        await poll(lambda: "q" not in worker.executors)
        assert await chancy.get_queue("q") is None
        assert await chancy.get_job(ref) is None  # purged with the queue
        assert not await chancy.delete_queue("q")


async def test_tags_select_queues(chancy: Chancy) -> None:
    await chancy.declare(Queue("gpu", tags={"gpu"}, executor=Chancy.Executor.Async))
    await chancy.declare(Queue("any", executor=Chancy.Executor.Async))
    async with serving(chancy, tags={"cpu"}) as worker:
        await poll(lambda: "any" in worker.queues)
        assert "gpu" not in worker.queues
    async with serving(chancy, tags={"gpu"}) as worker:
        await poll(lambda: {"gpu", "any"} <= set(worker.queues))
    async with serving(chancy, queues=["gpu"], tags={"gpu"}) as worker:
        await poll(lambda: "gpu" in worker.queues)
        assert "any" not in worker.queues


async def test_claim_guard_ignores_late_completion(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q", max_attempts=3))
    store = chancy.store
    async with chancy.pool.connection() as conn:
        (claimed,) = await arun(conn, store.fetch_jobs("q", "zombie", 10))
        assert claimed.id == ref and claimed.attempts == 1
        # The zombie's claim is taken over: recovered and re-claimed by another worker.
        await conn.execute("UPDATE chancy_jobs SET state = 'retrying' WHERE id = %s", (ref.uuid,))
        (again,) = await arun(conn, store.fetch_jobs("q", "alive", 10))
        assert again.attempts == 2
        late = await arun(conn, store.complete_jobs("zombie", [Outcome(claimed, "succeeded")]))
        assert late == set()
        job = await chancy.get_job(ref)
        assert job is not None and job.state == "running" and job.taken_by == "alive"
        ok = await arun(conn, store.complete_jobs("alive", [Outcome(again, "succeeded")]))
        assert ok == {ref}
        # A second report of the same attempt changes nothing either.
        assert await arun(conn, store.complete_jobs("alive", [Outcome(again, "failed")])) == set()
    final = await chancy.get_job(ref)
    assert final is not None and final.state == "succeeded"


async def test_notifications_off_still_polls(dsn: str) -> None:
    async with Chancy(dsn, notifications=False) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.2))
        async with serving(app):
            ref = await app.push(Job(func="tests.jobs.noop", queue="q"))
            job = await app.wait_for_job(ref, timeout=10)
    assert job is not None and job.state == "succeeded"


async def test_backlog_does_not_wait_for_polling_interval(chancy: Chancy) -> None:
    await chancy.declare(
        Queue("q", executor=Chancy.Executor.Async, concurrency=5, polling_interval=60)
    )
    refs = [
        r
        async for batch in chancy.push_many([Job(func="tests.jobs.noop", queue="q")] * 200)
        for r in batch
    ]
    async with serving(chancy):
        jobs = await chancy.wait_for_jobs(refs, timeout=20)
    assert len(jobs) == 200 and {j.state for j in jobs} == {QueuedJob.State.SUCCEEDED}


async def test_graceful_stop_hands_back_unfinished_jobs(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, concurrency=2))
    async with serving(chancy, shutdown_timeout=0.3):
        quick = await chancy.push(
            Job(func="tests.jobs.async_sleep", queue="q", kwargs={"seconds": 0.1})
        )
        slow = await chancy.push(
            Job(func="tests.jobs.async_sleep", queue="q", kwargs={"seconds": 30})
        )
        await chancy.wait_for_job(slow, states=["running"], timeout=10)
    quick_job, slow_job = await chancy.get_job(quick), await chancy.get_job(slow)
    assert quick_job is not None and quick_job.state == "succeeded"
    assert slow_job is not None and slow_job.state == "pending" and slow_job.attempts == 0
    assert await chancy.get_all_workers() == []


async def test_worker_registry_and_hub(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    async with serving(chancy, worker_id="w-1", tags={"extra"}) as worker:
        workers = await chancy.get_all_workers()
        assert [w["worker_id"] for w in workers] == ["w-1"]
        assert "extra" in workers[0]["tags"]
        completed = asyncio.ensure_future(worker.hub.wait_for("job.completed", timeout=10))
        await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        outcome = await completed
        assert outcome.state == "succeeded"


async def test_unsupported_executor_leaves_other_queues_running(chancy: Chancy) -> None:
    await chancy.declare(Queue("broken", executor="tests.jobs.NotAnExecutor"))
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    async with serving(chancy) as worker:
        ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        assert (await chancy.wait_for_job(ref, timeout=10)).state == "succeeded"  # type: ignore[union-attr]
        assert "broken" not in worker.executors


async def test_start_blocks_until_stop(chancy: Chancy) -> None:
    worker = Worker(chancy, register_signal_handlers=False)
    running = asyncio.ensure_future(worker.start())
    started = asyncio.ensure_future(worker.hub.wait_for("worker.started", timeout=10))
    await started
    assert not running.done()
    await worker.stop()
    await asyncio.wait_for(worker.wait_for_shutdown(), 5)
    await asyncio.wait_for(running, 5)
    assert await chancy.get_all_workers() == []


async def test_retry_job_and_queue_listing(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    await chancy.declare(Queue("b"))
    assert [q.name for q in await chancy.get_all_queues()] == ["b", "q"]
    async with serving(chancy):
        ref = await chancy.push(Job(func="tests.jobs.fail", queue="q"))
        failed = await chancy.wait_for_job(ref, timeout=10)
        assert failed is not None and failed.state == "failed" and failed.attempts == 1
        pending = await chancy.push(Job(func="tests.jobs.noop", queue="b"))
        assert not await chancy.retry_job(pending)  # not finished: nothing to retry
        assert await chancy.retry_job(ref)
        again = await chancy.wait_for_job(ref, timeout=10)
    assert again is not None and again.state == "failed" and again.attempts == 2
    assert again.max_attempts == 2 and len(again.errors) == 2


def test_sync_cancel(chancy: Chancy) -> None:
    with chancy:
        chancy.sync_declare(Queue("s"))
        ref = chancy.sync_push(Job(func="tests.jobs.noop", queue="s"))
        assert chancy.sync_cancel_job(ref)
        assert not chancy.sync_cancel_job(ref)
        job = chancy.sync_get_job(ref)
    assert job is not None and job.state == "cancelled" and job.completed_at is not None


async def test_lost_claims_are_handed_back(chancy: Chancy) -> None:
    """A claim that committed although the worker never saw the fetch's answer (its
    connection dropped) must not stay 'running' while the worker lives."""
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
    async with serving(chancy, worker_id="me"):
        ref = await chancy.push(
            Job(
                func="tests.jobs.noop",
                queue="q",
                scheduled_at=await db_now(chancy) + dt.timedelta(hours=1),
            )
        )
        async with chancy.pool.connection() as conn:
            await conn.execute(
                "UPDATE chancy_jobs SET state = 'running', attempts = 1, taken_by = 'me', "
                "started_at = now() - interval '1 minute', scheduled_at = now() WHERE id = %s",
                (ref.uuid,),
            )
        job = await chancy.wait_for_job(ref, timeout=10)
    assert job is not None and job.state == "succeeded" and job.attempts == 1
    assert "claim lost" in job.errors[0]["traceback"]


async def test_claims_never_exceed_concurrency_while_outcomes_are_unwritten(
    chancy: Chancy,
) -> None:
    """Outcomes are written on a slow tick here; the worker must not claim more jobs than
    it can run while earlier outcomes wait to be written. (Prefetch off: short jobs would
    otherwise let the executor hold 2 x concurrency more claims, on purpose.)"""
    await chancy.declare(
        Queue(
            "q",
            executor=Chancy.Executor.Async,
            concurrency=3,
            executor_options={"prefetch": 0},
        )
    )
    refs = [
        r
        async for batch in chancy.push_many([Job(func="tests.jobs.noop", queue="q")] * 40)
        for r in batch
    ]
    peak = 0
    async with serving(chancy, completion_interval=0.1):
        done = asyncio.ensure_future(chancy.wait_for_jobs(refs, timeout=30, interval=0.05))
        while not done.done():
            async with chancy.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM chancy_jobs WHERE state = 'running'")
                row = await cur.fetchone()
            peak = max(peak, row[0] if row else 0)
            await asyncio.sleep(0.01)
        jobs = await done
    assert len(jobs) == 40 and peak <= 3


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_unserialisable_result_is_stored_as_its_repr(chancy: Chancy, executor: str) -> None:
    await chancy.declare(Queue("q", executor=executor))
    async with serving(chancy):
        ref = await chancy.push(Job(func="tests.jobs.not_json", queue="q"))
        nan = await chancy.push(Job(func="tests.jobs.nan", queue="q"))
        job = await chancy.wait_for_job(ref, timeout=20)
        nan_job = await chancy.wait_for_job(nan, timeout=20)
    assert job is not None and job.state == "succeeded"
    assert isinstance(job.result, str) and job.result.startswith("<object object at")
    assert nan_job is not None and nan_job.state == "succeeded" and nan_job.result == "nan"


async def test_retry_job_respects_a_live_unique_key(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    first = await chancy.push(Job(func="tests.jobs.noop", queue="q", unique_key="k"))
    assert await chancy.cancel_job(first)
    second = await chancy.push(Job(func="tests.jobs.noop", queue="q", unique_key="k"))
    assert second != first
    assert not await chancy.retry_job(first)  # "k" is taken by the live second job
    assert await chancy.cancel_job(second)
    assert await chancy.retry_job(first)
    job = await chancy.get_job(first)
    assert job is not None and job.state == "pending"


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_output_the_database_cannot_store_does_not_stall_the_worker(
    chancy: Chancy, executor: str
) -> None:
    await chancy.declare(Queue("q", executor=executor))
    await chancy.declare(Queue("other", executor=Chancy.Executor.Async))
    async with serving(chancy):
        bad = await chancy.push(Job(func="tests.jobs.nul_output", queue="q", max_attempts=2))
        job = await chancy.wait_for_job(bad, timeout=20)
        after = await chancy.push(Job(func="tests.jobs.noop", queue="other"))
        later = await chancy.wait_for_job(after, timeout=10)
    assert job is not None and job.state == "succeeded" and job.result == "a\ufffdb"
    assert "bad \ufffd byte" in job.errors[0]["traceback"]
    assert job.meta == {"note": "x\ufffdy"}
    assert later is not None and later.state == "succeeded"


async def test_late_result_of_a_timed_out_thread_does_not_touch_its_retry(
    chancy: Chancy,
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=2))
    async with serving(chancy) as worker:
        ref = await chancy.push(
            Job(
                func="tests.jobs.sleep_first_attempt",
                queue="q",
                kwargs={"seconds": 1.5},
                max_attempts=3,
                limits=[Limit(Limit.Type.TIME, 1.0)],
            )
        )
        job = await chancy.wait_for_job(ref, timeout=15)
        # The first attempt's thread returns later; its result must change nothing.
        from tests.jobs import EVENTS

        await poll(lambda: f"first-attempt-{ref}" in EVENTS, timeout=5)
        await poll(lambda: not worker.executors["q"].running, timeout=5)
        await worker.flush_outcomes()
        again = await chancy.get_job(ref)
    assert job is not None and job.state == "succeeded" and job.result == 2
    assert again is not None and again.state == "succeeded" and again.attempts == 2


async def test_a_failing_plugin_hook_fails_only_that_job(dsn: str) -> None:
    from chancy.plugin import Plugin

    class Picky(Plugin):
        async def on_job_starting(self, worker: Worker, job: QueuedJob) -> QueuedJob:
            if job.func.endswith("fail_starting"):
                raise RuntimeError("no")
            return job

    async with Chancy(dsn, plugins=[Picky()]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        async with serving(app) as worker:
            bad = await app.push(Job(func="tests.jobs.fail_starting", queue="q"))
            good = await app.push(Job(func="tests.jobs.noop", queue="q"))
            jobs = {j.id: j for j in await app.wait_for_jobs([bad, good], timeout=10)}
            assert not worker.executors["q"].running
    assert jobs[bad].state == "failed" and "plugin failed" in jobs[bad].errors[0]["traceback"]
    assert jobs[good].state == "succeeded"


async def test_dead_idle_child_is_replaced_without_using_an_attempt(chancy: Chancy) -> None:
    from chancy.executors.process import ProcessExecutor

    await chancy.declare(
        Queue(
            "q",
            executor=Chancy.Executor.Process,
            concurrency=1,
            executor_options={"max_jobs_per_child": 2},
        )
    )
    async with serving(chancy) as worker:
        first = await chancy.push(Job(func="tests.jobs.record_pid", queue="q"))
        assert (await chancy.wait_for_job(first, timeout=20)).state == "succeeded"  # type: ignore[union-attr]
        executor = worker.executors["q"]
        assert isinstance(executor, ProcessExecutor)
        (idle,) = executor._children
        idle.process.kill()
        await asyncio.to_thread(idle.process.join, 10)
        refs = [await chancy.push(Job(func="tests.jobs.record_pid", queue="q")) for _ in range(3)]
        jobs = await chancy.wait_for_jobs(refs, timeout=20)
    assert [(j.state, j.attempts, j.errors) for j in jobs] == [("succeeded", 1, [])] * 3
    # max_jobs_per_child=2: the three jobs needed at least two fresh children.
    assert len({j.result for j in jobs} - {idle.process.pid}) >= 2


async def test_worker_warns_when_autovacuum_is_off_for_the_jobs_table(
    chancy: Chancy, caplog: pytest.LogCaptureFixture
) -> None:
    """Dead row versions pile up without vacuum: a worker says so once, at start."""
    from psycopg import sql

    async with chancy.pool.connection() as conn:
        table = sql.Identifier(chancy.prefix + "jobs")
        await conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))
    assert not await chancy._run(chancy.store.autovacuum_enabled())
    with caplog.at_level("WARNING"):
        async with serving(chancy) as worker:
            await poll(lambda: any("autovacuum is off" in r.getMessage() for r in caplog.records))
    warnings = [r for r in caplog.records if "autovacuum is off" in r.getMessage()]
    assert len(warnings) == 1 and worker.worker_id in warnings[0].getMessage()
    async with chancy.pool.connection() as conn:
        await conn.execute(sql.SQL("ALTER TABLE {} RESET (autovacuum_enabled)").format(table))
        server_on = await (
            await conn.execute("SELECT current_setting('autovacuum') = 'on'")
        ).fetchone()
    # With the table option reset, only the server setting decides.
    assert await chancy._run(chancy.store.autovacuum_enabled()) == bool(server_on and server_on[0])
