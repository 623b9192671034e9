"""row_to_job sets QueuedJob's fields directly (no validating constructor): it must give
exactly what the constructor would, for every field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from chancy import Chancy, Job, Queue
from chancy.job import Limit, QueuedJob, Reference
from chancy.store import row_to_job


def test_row_to_job_equals_the_constructor() -> None:
    now = dt.datetime.now(dt.UTC)
    row = {
        "id": uuid.uuid4(),
        "queue": "q",
        "func": "tests.jobs.noop",
        "kwargs": {"a": 1},
        "meta": None,
        "limits": [{"type": "time", "value": 3}],
        "priority": 5,
        "max_attempts": 2,
        "unique_key": "u",
        "concurrency_key": "k",
        "scheduled_at": now,
        "state": "running",
        "attempts": 1,
        "created_at": now,
        "started_at": now,
        "completed_at": None,
        "errors": [{"attempt": 1, "traceback": "x"}],
        "result": None,
        "taken_by": "w",
        "progress": None,
    }
    built = row_to_job(row)
    expected = QueuedJob(
        id=Reference(row["id"]),
        queue="q",
        func="tests.jobs.noop",
        kwargs={"a": 1},
        meta={},
        limits=[Limit("time", 3)],
        priority=5,
        max_attempts=2,
        unique_key="u",
        concurrency_key="k",
        scheduled_at=now,
        state=QueuedJob.State.RUNNING,
        attempts=1,
        created_at=now,
        started_at=now,
        errors=[{"attempt": 1, "traceback": "x"}],
        taken_by="w",
    )
    assert built == expected
    assert type(built.state) is QueuedJob.State
    # Every dataclass field is set, and nothing else.
    assert set(vars(built)) == {f.name for f in dataclasses.fields(QueuedJob)}
    # Still frozen.
    try:
        built.priority = 1  # type: ignore[misc]
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("QueuedJob from a row is mutable")


async def test_claimed_rows_read_by_position_match_rows_read_by_name(chancy: Chancy) -> None:
    """The claim reads its rows as tuples; the jobs equal what the named columns give."""
    await chancy.declare(Queue("pos", executor=Chancy.Executor.Async))
    for i in range(3):
        await chancy.push(
            Job(
                func="tests.jobs.noop",
                queue="pos",
                kwargs={"i": i},
                meta={"m": i} if i else {},
                limits=[Limit("time", 5)] if i == 2 else [],
                priority=i,
                concurrency_key="k" if i == 1 else None,
            )
        )
    claim = await chancy._run(chancy.store.claim_jobs("pos", "pos-worker", 10))
    assert [job.priority for job in claim.jobs] == [2, 1, 0]  # fetch order
    by_name = {
        job.id: job for job in await chancy._run(chancy.store.get_jobs([j.id for j in claim.jobs]))
    }
    for job in claim.jobs:
        assert job == by_name[job.id]
        assert job.taken_by == "pos-worker" and job.state is QueuedJob.State.RUNNING
