from __future__ import annotations

from chancy import Chancy, Job, Queue, QueuedJob, Worker


async def test_push_and_run_on_every_builtin_executor(chancy: Chancy) -> None:
    for name, executor in (
        ("p", Chancy.Executor.Process),
        ("t", Chancy.Executor.Threaded),
        ("a", Chancy.Executor.Async),
    ):
        await chancy.declare(Queue(name, executor=executor, concurrency=2))
    async with Worker(chancy, register_signal_handlers=False):
        refs = [
            await chancy.push(Job(func="tests.jobs.add", queue=q, kwargs={"a": 1, "b": i}))
            for i, q in enumerate("pta")
        ]
        jobs = await chancy.wait_for_jobs(refs, timeout=30)
    assert sorted(j.result for j in jobs) == [1, 2, 3]
    assert {j.state for j in jobs} == {QueuedJob.State.SUCCEEDED}
