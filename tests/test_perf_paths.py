"""Behaviour of the fast paths: the COPY bulk push stores exactly what the one-statement
push stores, and prefetched (claimed, not started) jobs keep the claim semantics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from chancy import Chancy, Job, Limit, Queue, QueuedJob, Reference, Worker
from chancy import store as store_module
from chancy.errors import ConfigurationError, JobArgumentsError, UnknownQueueError
from tests import jobs_perf

N = store_module.COPY_MIN_JOBS + 20
LATER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def batch(queue: str) -> list[Job]:
    """Jobs with every field varied; some scheduled in the future."""
    return [
        Job(
            func="tests.jobs.add",
            queue=queue,
            kwargs={"a": i, "b": "x\t\\y\n\u00e9"},
            meta={"i": i} if i % 3 else {},
            limits=[Limit(Limit.Type.TIME, 5)] if i % 4 == 0 else [],
            priority=i % 5,
            max_attempts=1 + i % 3,
            scheduled_at=LATER if i % 7 == 0 else None,
            concurrency_key=f"k\\{i % 2}" if i % 3 == 0 else None,
        )
        for i in range(N)
    ]


def comparable(job: QueuedJob) -> tuple[Any, ...]:
    return (
        job.func,
        job.kwargs,
        job.meta,
        [limit.to_dict() for limit in job.limits],
        job.priority,
        job.max_attempts,
        job.state,
        job.attempts,
        job.unique_key,
        job.concurrency_key,
        job.scheduled_at if job.scheduled_at == LATER else "now",
    )


async def count_jobs(app: Chancy) -> int:
    async with app.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {app.store.prefix}jobs")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_copy_push_stores_what_the_array_push_stores(
    chancy: Chancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    await chancy.declare(Queue("copy", executor=Chancy.Executor.Async))
    await chancy.declare(Queue("array", executor=Chancy.Executor.Async))
    before = time.time()
    copied = [ref async for refs in chancy.push_many(batch("copy"), batch_size=N) for ref in refs]
    monkeypatch.setattr(store_module, "COPY_MIN_JOBS", 10**9)  # the one-statement path
    arrayed = [ref async for refs in chancy.push_many(batch("array"), batch_size=N) for ref in refs]
    assert len(copied) == len(set(copied)) == len(arrayed) == N
    got_copied = {j.id: j for j in await chancy.get_jobs(copied)}
    got_arrayed = {j.id: j for j in await chancy.get_jobs(arrayed)}
    # The references come back in the caller's order and name the stored jobs.
    assert [comparable(got_copied[r]) for r in copied] == [
        comparable(got_arrayed[r]) for r in arrayed
    ]
    assert [got_copied[r].kwargs["a"] for r in copied] == list(range(N))
    assert {got_copied[r].concurrency_key for r in copied} == {None, "k\\0", "k\\1"}
    for job in got_copied.values():
        assert job.queue == "copy"
        if job.scheduled_at != LATER:
            assert job.scheduled_at.timestamp() >= before - 60


async def test_copy_push_results_are_all_inserted(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    results = await chancy.push_detailed(batch("q"))
    assert len(results) == N and all(r.inserted for r in results)
    assert await count_jobs(chancy) == N


async def test_copy_push_unknown_queue_inserts_nothing(chancy: Chancy) -> None:
    await chancy.declare(Queue("known", executor=Chancy.Executor.Async))
    jobs = batch("known")
    jobs[5] = Job(func="tests.jobs.noop", queue="nowhere")
    with pytest.raises(UnknownQueueError, match="nowhere"):
        async for _ in chancy.push_many(jobs, batch_size=N):
            pass
    assert await count_jobs(chancy) == 0


async def test_copy_push_bad_input_fails_before_sql_and_caller_txn_stays_usable(
    chancy: Chancy,
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    jobs = batch("q")
    jobs[-1] = Job(func="tests.jobs.echo", queue="q", kwargs={"x": object()})
    async with chancy.connection() as conn, conn.transaction():
        with pytest.raises(JobArgumentsError, match=r"kwargs of tests\.jobs\.echo"):
            await chancy.push_many_ex(conn, jobs)
        # The transaction is still usable: the good jobs go in with it.
        refs = await chancy.push_many_ex(conn, jobs[:-1])
    assert len(refs) == N - 1
    assert await count_jobs(chancy) == N - 1


async def test_copy_push_in_a_rolled_back_transaction_leaves_nothing(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback):
        async with chancy.connection() as conn, conn.transaction():
            await chancy.push_many_ex(conn, batch("q"))
            raise Rollback
    assert await count_jobs(chancy) == 0


def test_sync_copy_push(dsn: str) -> None:
    with Chancy(dsn) as app:
        app.sync_migrate()
        app.sync_declare(Queue("q", executor=Chancy.Executor.Async))
        refs = [r for refs in app.sync_push_many(batch("q"), batch_size=N) for r in refs]
        assert len(refs) == N
        stored = app.sync_get_jobs(refs)
        assert sorted(j.kwargs["a"] for j in stored) == list(range(N))


async def test_copy_push_notifies_once_per_queue_with_due_jobs(chancy: Chancy, dsn: str) -> None:
    await chancy.declare(Queue("due", executor=Chancy.Executor.Async))
    await chancy.declare(Queue("later", executor=Chancy.Executor.Async))
    jobs = batch("due") + [Job(func="tests.jobs.noop", queue="later", scheduled_at=LATER)] * N
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {chancy.store.channel}")
        async for _ in chancy.push_many(jobs, batch_size=len(jobs)):
            pass
        events = [json.loads(n.payload) async for n in listener.notifies(timeout=1.0)]
    # (The channel is per database: other schemas' events are left out.)
    pushed = [e for e in events if e.get("e") == "pushed" and e.get("q") in ("due", "later")]
    assert pushed == [{"e": "pushed", "q": "due"}]


# -- prefetch ---------------------------------------------------------------------------


async def poll(check: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def worker_for(app: Chancy, **kwargs: Any) -> Worker:
    settings: dict[str, Any] = {
        "register_signal_handlers": False,
        "queue_change_poll_interval": 0.2,
        "heartbeat_poll_interval": 0.2,
        "shutdown_timeout": 0.5,
    }
    settings.update(kwargs)
    return Worker(app, **settings)


@pytest.fixture
def gate() -> Any:
    jobs_perf.GATE.clear()
    jobs_perf.RAN.clear()
    yield jobs_perf.GATE
    jobs_perf.GATE.set()


@contextlib.asynccontextmanager
async def one_busy_slot(app: Chancy, prefetch: int = 1) -> AsyncIterator[tuple[Worker, Reference]]:
    """A worker serving queue "q" with one thread and room for ``prefetch`` claimed jobs,
    its slot taken by a job that waits for the gate; yields the worker and that job."""
    await app.declare(
        Queue(
            "q",
            executor=Chancy.Executor.Threaded,
            concurrency=1,
            executor_options={"prefetch": prefetch},
        )
    )
    blocker = await app.push(Job(func="tests.jobs_perf.wait_gate", queue="q"))
    async with worker_for(app) as worker:
        await app.wait_for_job(blocker, states=["running"], timeout=15)
        yield worker, blocker


async def test_prefetched_jobs_are_handed_back_on_shutdown(chancy: Chancy, gate: Any) -> None:
    async with one_busy_slot(chancy, prefetch=2) as (worker, _):
        waiting = [
            await chancy.push(Job(func="tests.jobs_perf.record", queue="q", kwargs={"n": i}))
            for i in range(2)
        ]
        executor = worker.executors["q"]
        await poll(lambda: executor.buffered == 2)
        # Claimed (running in the database) but not started.
        assert {j.state for j in await chancy.get_jobs(waiting)} == {"running"}
        assert jobs_perf.RAN == []
    # Shutdown handed them back without using up an attempt; they never ran here.
    back = await chancy.get_jobs(waiting)
    assert [(j.state, j.attempts) for j in back] == [("pending", 0), ("pending", 0)]
    assert jobs_perf.RAN == []
    gate.set()


async def test_prefetched_job_runs_when_a_slot_frees(chancy: Chancy, gate: Any) -> None:
    async with one_busy_slot(chancy) as (worker, _):
        nxt = await chancy.push(Job(func="tests.jobs_perf.record", queue="q", kwargs={"n": 7}))
        await poll(lambda: worker.executors["q"].buffered == 1)
        assert jobs_perf.RAN == []  # only one slot: it waits
        gate.set()
        done = await chancy.wait_for_job(nxt, timeout=15)
    assert done is not None and done.state == "succeeded" and done.attempts == 1
    assert jobs_perf.RAN == [7]


async def test_cancelled_prefetched_job_never_runs(chancy: Chancy, gate: Any) -> None:
    async with one_busy_slot(chancy) as (worker, blocker):
        victim = await chancy.push(Job(func="tests.jobs_perf.record", queue="q", kwargs={"n": 1}))
        await poll(lambda: worker.executors["q"].buffered == 1)
        assert await chancy.cancel_job(victim)
        done = await chancy.wait_for_job(victim, timeout=15)
        assert done is not None and done.state == "cancelled"
        # The database says cancelled at once; the worker hears of it by NOTIFY (or poll).
        await poll(lambda: worker.executors["q"].buffered == 0)
        gate.set()
        await chancy.wait_for_job(blocker, timeout=15)
    assert jobs_perf.RAN == []


async def test_time_limit_of_a_prefetched_job_starts_when_it_starts(
    chancy: Chancy, gate: Any
) -> None:
    async with one_busy_slot(chancy) as (worker, _):
        limited = await chancy.push(
            Job(
                func="tests.jobs_perf.record",
                queue="q",
                kwargs={"n": 3},
                limits=[Limit(Limit.Type.TIME, 1)],
            )
        )
        await poll(lambda: worker.executors["q"].buffered == 1)
        # Held in the buffer longer than its limit (time passing is the point here):
        # that wait does not count against it.
        await asyncio.sleep(1.5)
        assert worker.executors["q"].buffered == 1
        gate.set()
        done = await chancy.wait_for_job(limited, timeout=15)
    assert done is not None and done.state == "succeeded"
    assert jobs_perf.RAN == [3]


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
async def test_bad_prefetch_option_is_refused(chancy: Chancy, bad: object) -> None:
    from chancy.executors.thread import ThreadedExecutor

    await chancy.declare(
        Queue("q", executor=Chancy.Executor.Threaded, executor_options={"prefetch": bad})
    )
    queue = await chancy.get_queue("q")
    assert queue is not None
    with pytest.raises(ConfigurationError, match="prefetch"):
        ThreadedExecutor(worker_for(chancy), queue, **dict(queue.executor_options))


def test_uuid7_many_is_ordered_unique_and_version_7() -> None:
    from chancy.job import uuid7, uuid7_many

    before = uuid7()
    many = uuid7_many(5000)
    after = uuid7()
    assert len(set(many)) == 5000
    assert all(u.version == 7 for u in many)
    assert [before, *many, after] == sorted([before, *many, after])
    assert uuid7_many(0) == []


def test_copy_text_escapes_what_copy_would_misread() -> None:
    assert store_module.copy_text('{"a": "x\\\\y"}') == '{"a": "x\\\\\\\\y"}'
    assert store_module.copy_text("a\tb\nc\rd") == "a\\tb\\nc\\rd"
    assert store_module.copy_text("plain") == "plain"


async def test_adaptive_prefetch_follows_the_pace_of_jobs(chancy: Chancy) -> None:
    """Without a prefetch option the async executor holds extra claims (a multiple of
    ``concurrency``) only while its jobs are short (each slot turns over >= SHORT_JOB_PACE times a
    second); slow jobs are never held back from other workers."""
    from chancy.executors.asyncex import AsyncExecutor

    queue = Queue("pace", executor=Chancy.Executor.Async, concurrency=4)
    executor = AsyncExecutor(worker_for(chancy), queue)
    assert executor.prefetch == 0  # nothing measured yet
    assert executor._pace_since is not None

    def one_period(finished_per_slot_per_s: float) -> int:
        # As if PACE_PERIOD * 4 seconds passed with this many jobs finishing.
        span = executor.PACE_PERIOD * 4
        assert executor._pace_since is not None
        executor._pace_since -= span
        executor._finished = int(finished_per_slot_per_s * span * executor.concurrency)
        return executor.prefetch

    assert one_period(executor.SHORT_JOB_PACE * 2) == 4 * executor.SHORT_JOB_PREFETCH
    assert executor.capacity == 4 + 4 * executor.SHORT_JOB_PREFETCH
    assert one_period(executor.SHORT_JOB_PACE / 4) == 0  # jobs got slow
    assert executor.capacity == 4
    # An explicit option is kept whatever the pace.
    fixed = AsyncExecutor(worker_for(chancy), queue, prefetch=1)
    fixed._finished = 10_000
    assert fixed.prefetch == 1
    assert fixed.prefetch == 1


# -- claim-guarded writes look jobs up by primary key -----------------------------------


async def nested_plans(chancy: Chancy, op: Any) -> list[str]:
    """Run a store operation on a fresh connection with auto_explain reporting the plans
    of the statements inside functions (as NOTICEs); returns those plans."""
    plans: list[str] = []
    async with await psycopg.AsyncConnection.connect(chancy.dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        await conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_level = 'notice'",
        ):
            await conn.execute(f"SET {setting}")
        await store_module.arun(conn, op)
    return plans


@pytest.mark.parametrize("write", ["complete", "progress"])
async def test_claim_guarded_writes_probe_the_primary_key(chancy: Chancy, write: str) -> None:
    """Outcomes and progress are matched to their jobs one primary-key probe each. (On a
    table without fresh statistics the plain statement was planned as a join that
    rescanned the whole batch for every running job: quadratic in the batch.)"""
    await chancy.declare(Queue("probe", executor=Chancy.Executor.Async))
    for _ in range(60):
        await chancy.push(Job(func="tests.jobs.noop", queue="probe"))
    store = chancy.store
    claim = await chancy._run(store.claim_jobs("probe", "probe-worker", 60))
    assert len(claim.jobs) == 60
    if write == "complete":
        outcomes = [store_module.Outcome(job, "succeeded") for job in claim.jobs]
        op: Any = store.complete_jobs("probe-worker", outcomes)
    else:
        op = store.update_progress(
            "probe-worker", [(job, {"percent": 50, "message": None}) for job in claim.jobs]
        )
    plans = [plan for plan in await nested_plans(chancy, op) if "Update on" in plan]
    assert len(plans) == 1, plans
    plan = plans[0]
    assert f"Index Scan using {chancy.prefix}jobs_pkey" in plan, plan
    assert "Seq Scan" not in plan and "Bitmap" not in plan, plan
    # And the writes took effect, each guarded by its claim.
    held = await chancy._run(store.get_jobs([job.id for job in claim.jobs]))
    if write == "complete":
        assert {job.state for job in held} == {"succeeded"}
    else:
        assert {job.state for job in held} == {"running"}
        assert all(job.progress == {"percent": 50, "message": None} for job in held)
