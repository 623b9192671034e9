"""The Process executor's child queues: jobs sent ahead to a child keep every guarantee of
a job that has not started (a dead child, a cancellation or a shutdown hands them back
without using an attempt, and they never run there), and they do not wait behind a long
job while a sibling has room."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from chancy import Chancy, Job, Limit, Queue, Reference, Worker
from chancy.executors import process
from chancy.executors.process import ProcessExecutor
from tests.test_worker import poll, serving


def gate_job(gate: Path) -> Job:
    """Blocks until ``gate`` exists; ``gate.started`` exists once it runs in a child."""
    kwargs = {"started": str(gate.with_suffix(".started")), "gate": str(gate)}
    return Job(func="tests.jobs_process.started_then_wait", queue="q", kwargs=kwargs)


async def started(gate: Path) -> None:
    """Wait until the gate job runs in a child (``running`` in the database only says
    that it was claimed)."""
    await poll(gate.with_suffix(".started").exists)


def touch_job(mark: Path, **fields: Any) -> Job:
    return Job(func="tests.jobs_process.touch", queue="q", kwargs={"path": str(mark)}, **fields)


async def push_together(app: Chancy, jobs: list[Job]) -> list[Reference]:
    """Push in one transaction, before the worker starts: its first fetch claims them all
    and sends them to a child in one message."""
    return [ref async for batch in app.push_many(jobs) for ref in batch]


def process_executor(worker: Worker) -> ProcessExecutor:
    executor = worker.executors["q"]
    assert isinstance(executor, ProcessExecutor)
    return executor


def record_batches(executor: ProcessExecutor) -> list[int]:
    """Sizes of the messages the executor sends to its children, in order."""
    sizes: list[int] = []
    send = executor._send

    def recording(child: Any, slots: list[Any]) -> None:
        sizes.append(len(slots))
        send(child, slots)

    executor._send = recording  # type: ignore[method-assign]
    return sizes


async def test_jobs_queued_behind_a_dying_job_run_on_another_child(
    chancy: Chancy, tmp_path: Path
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    marks = [tmp_path / f"mark-{i}" for i in range(3)]
    first, poison, *rest = await push_together(
        chancy,
        [
            touch_job(marks[0], priority=3),
            Job(func="tests.jobs.die", queue="q", priority=2),
            touch_job(marks[1], priority=1),
            touch_job(marks[2], priority=1),
        ],
    )
    async with serving(chancy) as worker:
        sizes = record_batches(process_executor(worker))
        jobs = {j.id: j for j in await chancy.wait_for_jobs([first, poison, *rest], timeout=30)}
    assert sizes[0] == 4  # all four went to the one child together
    assert jobs[poison].state == "failed" and jobs[poison].attempts == 1
    assert "WorkerDiedError" in jobs[poison].errors[-1]["traceback"]
    # Only the job the child was running failed; those queued behind it ran on a new
    # child, on their first attempt, without an error.
    for ref in [first, *rest]:
        assert (jobs[ref].state, jobs[ref].attempts, jobs[ref].errors) == ("succeeded", 1, [])
    assert jobs[rest[0]].result == jobs[rest[1]].result != jobs[first].result


async def test_cancelling_a_queued_job_takes_it_back_at_once(
    chancy: Chancy, tmp_path: Path
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    gate, mark, after = tmp_path / "gate", tmp_path / "victim", tmp_path / "after"
    blocker, victim, follower = await push_together(
        chancy,
        [gate_job(gate).with_priority(2), touch_job(mark, priority=1), touch_job(after)],
    )
    async with serving(chancy) as worker:
        sizes = record_batches(process_executor(worker))
        await started(gate)
        assert await chancy.cancel_job(victim)
        # Cancelled while the job ahead of it still runs: it did not wait for its turn.
        cancelled = await chancy.wait_for_job(victim, timeout=10)
        assert cancelled is not None and cancelled.state == "cancelled"
        assert (await chancy.get_job(blocker)).state == "running"  # type: ignore[union-attr]
        gate.touch()
        done = await chancy.wait_for_jobs([blocker, follower], timeout=15)
    assert sizes[0] == 3
    assert [j.state for j in done] == ["succeeded", "succeeded"]
    assert after.exists() and not mark.exists()


async def test_jobs_queued_behind_a_long_job_move_to_an_idle_child(
    chancy: Chancy, tmp_path: Path
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=2))
    gate = tmp_path / "gate"
    marks = [tmp_path / f"mark-{i}" for i in range(3)]
    blocker, *quick = await push_together(
        chancy, [gate_job(gate).with_priority(1), *(touch_job(m) for m in marks)]
    )
    async with serving(chancy) as worker:
        sizes = record_batches(process_executor(worker))
        done = await chancy.wait_for_jobs(quick, timeout=20)
        # They finished on the second child while the first one still runs the long job.
        assert (await chancy.get_job(blocker)).state == "running"  # type: ignore[union-attr]
        gate.touch()
        await chancy.wait_for_job(blocker, timeout=15)
    assert sizes[0] == 4
    assert {(j.state, j.attempts) for j in done} == {("succeeded", 1)}
    assert len({j.result for j in done}) == 1


async def test_shutdown_hands_back_jobs_queued_in_a_child(chancy: Chancy, tmp_path: Path) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    marks = [tmp_path / f"mark-{i}" for i in range(2)]
    running, *queued = await push_together(
        chancy,
        [
            Job(
                func="tests.jobs_process.started_then_sleep",
                queue="q",
                kwargs={"started": str(tmp_path / "started"), "seconds": 1},
                priority=1,
            ),
            *(touch_job(m) for m in marks),
        ],
    )
    async with serving(chancy, shutdown_timeout=10) as worker:
        sizes = record_batches(process_executor(worker))
        await poll((tmp_path / "started").exists)
    assert sizes[0] == 3
    # The running job finished within shutdown_timeout; those queued behind it went back
    # when the shutdown began (no attempt used) instead of starting after it.
    jobs = {j.id: j for j in await chancy.get_jobs([running, *queued])}
    assert (jobs[running].state, jobs[running].attempts) == ("succeeded", 1)
    assert [(jobs[r].state, jobs[r].attempts) for r in queued] == [("pending", 0)] * 2
    assert not any(m.exists() for m in marks)


async def test_time_limit_of_a_queued_job_starts_when_it_starts(
    chancy: Chancy, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue(
            "q",
            executor=Chancy.Executor.Process,
            concurrency=1,
            executor_options={"kill_grace": 0.2},
        )
    )
    gate = tmp_path / "gate"
    blocker, limited = await push_together(
        chancy,
        [
            gate_job(gate).with_priority(1),
            touch_job(tmp_path / "mark", limits=[Limit(Limit.Type.TIME, 0.5)]),
        ],
    )
    async with serving(chancy) as worker:
        sizes = record_batches(process_executor(worker))
        await started(gate)
        # Queued in the child for longer than its limit and grace (time passing is the
        # point): neither its time limit nor the kill backstop counts that wait.
        await asyncio.sleep(1.2)
        gate.touch()
        done = await chancy.wait_for_jobs([blocker, limited], timeout=15)
    assert sizes[0] == 2
    assert [(j.state, j.attempts) for j in done] == [("succeeded", 1), ("succeeded", 1)]


async def test_a_child_busy_with_a_long_job_stops_further_claims(
    chancy: Chancy, tmp_path: Path
) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    gate = tmp_path / "gate"
    await chancy.push(gate_job(gate))
    async with serving(chancy) as worker:
        executor = process_executor(worker)
        await started(gate)
        await poll(lambda: executor.capacity == 1)
        later = await push_together(chancy, [touch_job(tmp_path / f"m{i}") for i in range(5)])
        # While the long job runs, none of them is claimed only to wait behind it (time
        # passing is the point).
        await asyncio.sleep(0.5)
        assert {j.state for j in await chancy.get_jobs(later)} == {"pending"}
        gate.touch()
        done = await chancy.wait_for_jobs(later, timeout=15)
    assert {j.state for j in done} == {"succeeded"}


async def test_short_jobs_deepen_the_child_queues(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    refs = await push_together(chancy, [Job(func="tests.jobs.noop", queue="q")] * 300)
    async with serving(chancy) as worker:
        executor = process_executor(worker)
        base = executor.concurrency + executor.prefetch
        sizes = record_batches(executor)
        done = await chancy.wait_for_jobs(refs, timeout=60)
        assert executor.capacity > base
    assert {j.state for j in done} == {"succeeded"}
    assert max(sizes) > base


def test_the_cancel_signal_raises_only_in_the_job_it_names() -> None:
    cells = [0] * (1 + process._RING)
    saved = process._cells, process._running
    process._cells = cells
    try:
        cells[process._CANCEL] = 5
        process._running = 6  # job 5 ended before the signal came: job 6 runs on
        process._raise_cancelled(process.CANCEL_SIGNAL, None)
        process._running = 0  # between jobs
        process._raise_cancelled(process.CANCEL_SIGNAL, None)
        process._running = 5
        try:
            process._raise_cancelled(process.CANCEL_SIGNAL, None)
        except process.JobCancelledError:
            pass
        else:
            raise AssertionError("the named job was not interrupted")
    finally:
        process._cells, process._running = saved
