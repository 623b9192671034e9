"""The sub-interpreter executor (runs on CPython 3.13+; `scripts/test` runs it there)."""

from __future__ import annotations

import sys

from chancy import Chancy, Job, Limit, Queue, Worker
from chancy.errors import UnsupportedExecutorError


async def test_jobs_run_in_sub_interpreters(chancy: Chancy) -> None:
    await chancy.declare(Queue("sub", executor=Chancy.Executor.SubInterpreter, concurrency=2))
    async with Worker(chancy, register_signal_handlers=False) as worker:
        refs = [
            await chancy.push(Job(func="tests.subinterp_jobs.square", queue="sub", kwargs={"x": i}))
            for i in range(6)
        ]
        bad = await chancy.push(Job(func="tests.subinterp_jobs.fail", queue="sub"))
        slow = await chancy.push(
            Job(
                func="tests.subinterp_jobs.sleep",
                queue="sub",
                kwargs={"seconds": 3},
                limits=[Limit(Limit.Type.TIME, 0.3)],
            )
        )
        jobs = await chancy.wait_for_jobs([*refs, bad, slow], timeout=30)
        assert type(worker.executors["sub"]).__name__ == "SubInterpreterExecutor"
    by_id = {j.id: j for j in jobs}
    assert sorted(by_id[r].result["square"] for r in refs) == [0, 1, 4, 9, 16, 25]
    # A sub-interpreter has its own, much smaller, module table.
    assert all(by_id[r].result["interpreter_modules"] < len(sys.modules) for r in refs)
    assert by_id[bad].state == "failed"
    assert "KeyError" in by_id[bad].errors[-1]["traceback"]
    assert by_id[slow].state == "failed"
    assert "JobTimeoutError" in by_id[slow].errors[-1]["traceback"]


def test_this_interpreter_has_sub_interpreters() -> None:
    from chancy.executors.sub import require_subinterpreters

    try:
        require_subinterpreters()
    except UnsupportedExecutorError as exc:  # pragma: no cover - only on < 3.13
        raise AssertionError("scripts/test runs this file on CPython 3.13+") from exc
