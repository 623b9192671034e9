"""The Threaded executor's own scheduling: threads take claimed jobs from a local queue,
one awake thread at a time for short jobs, more as soon as jobs wait for one; finished
jobs reach the loop in batches; the prefetch grows while jobs are short."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from chancy import Chancy, Job, Limit, Queue
from chancy.executors.thread import ThreadedExecutor
from tests import jobs_thread
from tests.test_worker import poll, serving


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    jobs_thread.GATE.clear()
    yield jobs_thread.GATE
    jobs_thread.GATE.set()


async def test_jobs_that_wait_for_each_other_run_side_by_side(chancy: Chancy) -> None:
    # Each job returns only once all four run at once: one thread taking the queue
    # alone would deadlock, so this needs a thread per slot while jobs wait.
    jobs_thread.MEETING[:] = [threading.Barrier(4)]
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=4))
    refs = [await chancy.push(Job(func="tests.jobs_thread.meet", queue="q")) for _ in range(4)]
    async with serving(chancy):
        done = await chancy.wait_for_jobs(refs, timeout=30)
    assert sorted(job.state for job in done) == ["succeeded"] * 4
    assert sorted(job.result for job in done) == [0, 1, 2, 3]


async def test_a_finished_job_is_recorded_while_its_thread_runs_the_next(
    chancy: Chancy, gate: threading.Event
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=1))
    quick = Job(func="tests.jobs_thread.noop", queue="q", priority=1)
    async with chancy.connection() as conn:  # one claim: the thread takes both in turn
        refs = await chancy.push_many_ex(
            conn, [quick, Job(func="tests.jobs_thread.wait_gate", queue="q")]
        )
    async with serving(chancy) as worker:
        await chancy.wait_for_job(refs[1], states=["running"], timeout=15)
        first = await chancy.wait_for_job(refs[0], timeout=15)
        assert first is not None and first.state == "succeeded"
        assert worker.executors["q"].running.keys() == {refs[1]}
        gate.set()
        second = await chancy.wait_for_job(refs[1], timeout=15)
    assert second is not None and second.state == "succeeded"


async def test_a_slot_given_up_by_a_timed_out_job_is_used_at_once(
    chancy: Chancy, gate: threading.Event
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=1))
    stuck = await chancy.push(
        Job(
            func="tests.jobs_thread.wait_gate",
            queue="q",
            limits=[Limit(Limit.Type.TIME, 0.5)],
        )
    )
    async with serving(chancy):
        timed_out = await chancy.wait_for_job(stuck, timeout=15)
        assert timed_out is not None and timed_out.state == "failed"
        # Its thread is still blocked; the next job gets another one.
        nxt = await chancy.push(Job(func="tests.jobs_thread.noop", queue="q"))
        done = await chancy.wait_for_job(nxt, timeout=15)
        assert done is not None and done.state == "succeeded"
        assert not gate.is_set()
        gate.set()


async def test_each_job_starts_in_a_fresh_context(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=1))
    async with chancy.connection() as conn:
        refs = await chancy.push_many_ex(
            conn,
            [
                Job(func="tests.jobs_thread.leave_mark", queue="q", kwargs={"value": str(i)})
                for i in range(5)
            ],
        )
    async with serving(chancy):
        done = await chancy.wait_for_jobs(refs, timeout=30)
    assert [(job.state, job.result) for job in done] == [("succeeded", None)] * 5


async def test_prefetch_grows_while_jobs_are_short_and_falls_for_a_slow_one(
    chancy: Chancy,
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Threaded, concurrency=2))
    async with serving(chancy) as worker:
        async with chancy.connection() as conn:
            refs = await chancy.push_many_ex(
                conn, [Job(func="tests.jobs_thread.noop", queue="q") for _ in range(300)]
            )
        await chancy.wait_for_jobs(refs, timeout=60)
        executor = worker.executors["q"]
        assert isinstance(executor, ThreadedExecutor)
        assert 3 * 2 < executor.prefetch <= executor.max_prefetch
        slow = await chancy.push(Job(func="tests.jobs.sleep", queue="q", kwargs={"seconds": 0.3}))
        await chancy.wait_for_job(slow, timeout=15)
        await poll(lambda: executor.prefetch == 3 * 2)


async def test_a_prefetch_option_is_kept_as_given(chancy: Chancy) -> None:
    await chancy.declare(
        Queue(
            "q",
            executor=Chancy.Executor.Threaded,
            concurrency=2,
            executor_options={"prefetch": 5},
        )
    )
    async with serving(chancy) as worker:
        async with chancy.connection() as conn:
            refs = await chancy.push_many_ex(
                conn, [Job(func="tests.jobs_thread.noop", queue="q") for _ in range(100)]
            )
        await chancy.wait_for_jobs(refs, timeout=60)
        assert worker.executors["q"].prefetch == 5
