"""row_to_job sets QueuedJob's fields directly (no validating constructor): it must give
exactly what the constructor would, for every field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

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
