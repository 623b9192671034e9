"""Value types: validation happens at construction, before any SQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest

from chancy import Job, Limit, Queue, QueuedJob, Reference
from chancy.errors import (
    ChancyError,
    InvalidNameError,
    JobValidationError,
    QueueValidationError,
)
from chancy.job import PRIORITY_MAX, PRIORITY_MIN, uuid7


def test_job_defaults_and_immutability() -> None:
    j = Job(func="tests.jobs.add", kwargs={"a": 1})
    assert j.queue == "default" and j.priority == 0 and j.max_attempts == 1
    assert j.scheduled_at is None and j.limits == [] and j.unique_key is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        j.priority = 3  # type: ignore[misc]


def test_with_methods_return_copies() -> None:
    base = Job(func="tests.jobs.add")
    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    changed = (
        base.with_priority(5)
        .with_max_attempts(3)
        .with_scheduled_at(when)
        .with_limits([Limit(Limit.Type.TIME, 10)])
        .with_kwargs(a=1)
        .with_kwargs(b=2)
        .with_unique_key("k")
        .with_queue("other")
        .with_meta({"m": 1})
    )
    assert base == Job(func="tests.jobs.add")
    assert changed.priority == 5 and changed.max_attempts == 3
    assert changed.scheduled_at == when and changed.kwargs == {"a": 1, "b": 2}
    assert changed.limits == [Limit(Limit.Type.TIME, 10)]
    assert changed.unique_key == "k" and changed.queue == "other" and changed.meta == {"m": 1}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"func": "no_module"}, InvalidNameError),
        ({"func": "bad name.f"}, InvalidNameError),
        ({"func": "m.f", "queue": "has space"}, InvalidNameError),
        ({"func": "m.f", "queue": ""}, InvalidNameError),
        ({"func": "m.f", "queue": "x" * 101}, InvalidNameError),
        ({"func": "m.f", "priority": PRIORITY_MAX + 1}, JobValidationError),
        ({"func": "m.f", "priority": PRIORITY_MIN - 1}, JobValidationError),
        ({"func": "m.f", "priority": 1.5}, JobValidationError),
        ({"func": "m.f", "priority": True}, JobValidationError),
        ({"func": "m.f", "max_attempts": 0}, JobValidationError),
        ({"func": "m.f", "max_attempts": -1}, JobValidationError),
        ({"func": "m.f", "scheduled_at": dt.datetime(2030, 1, 1)}, JobValidationError),
        ({"func": "m.f", "scheduled_at": "tomorrow"}, JobValidationError),
        ({"func": "m.f", "kwargs": {1: "x"}}, JobValidationError),
        ({"func": "m.f", "kwargs": ["x"]}, JobValidationError),
        ({"func": "m.f", "unique_key": ""}, JobValidationError),
        ({"func": "m.f", "limits": ["10s"]}, JobValidationError),
        ({"func": "m.f", "limits": "10s"}, JobValidationError),
        ({"func": "m." + "f" * 1000}, InvalidNameError),
        ({"func": "m.f", "unique_key": "a\x00b"}, JobValidationError),
    ],
)
def test_invalid_job_fields_raise_typed_errors(fields: dict[str, object], error: type) -> None:
    with pytest.raises(error) as info:
        Job(**fields)  # type: ignore[arg-type]
    assert isinstance(info.value, ChancyError)


def test_priority_bounds_are_accepted() -> None:
    assert Job(func="m.f", priority=PRIORITY_MAX).priority == PRIORITY_MAX
    assert Job(func="m.f", priority=PRIORITY_MIN).priority == PRIORITY_MIN


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("time", 0),
        ("time", -1),
        ("memory", 1.5),
        ("speed", 1),
        ("time", "1"),
        ("time", float("inf")),
        ("time", float("nan")),
    ],
)
def test_invalid_limits(kind: str, value: object) -> None:
    with pytest.raises(JobValidationError):
        Limit(kind, value)  # type: ignore[arg-type]


def test_limit_round_trip() -> None:
    limit = Limit(Limit.Type.MEMORY, 1024)
    assert Limit.from_dict(limit.to_dict()) == limit


def test_reference_equality_and_hashing() -> None:
    raw = uuid.uuid4()
    ref = Reference(raw)
    assert ref == raw and ref == str(raw) and ref == Reference(str(raw))
    assert ref != "not-a-uuid" and ref != uuid.uuid4()
    assert len({ref, Reference(raw)}) == 1
    assert {ref: 1}.get(str(raw)) == 1  # equal to its string, and hashes like it
    assert ref.identifier == str(raw) and str(ref) == str(raw)
    with pytest.raises(JobValidationError):
        Reference("nope")


def test_uuid7_is_time_ordered_and_unique() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids[:10])


def test_job_decorator_keeps_function_callable_and_typed_bind() -> None:
    from tests.jobs import decorated_add

    assert decorated_add(1, 2) == 3
    assert decorated_add.job.func == "tests.jobs.decorated_add"
    assert decorated_add.job.queue == "decorated" and decorated_add.job.max_attempts == 3
    bound = decorated_add.bind(1, b=5)
    assert bound.kwargs == {"a": 1, "b": 5}
    with pytest.raises(JobValidationError):
        decorated_add.bind(1, c=3)  # type: ignore[call-arg]


def test_from_func_rejects_unimportable_functions() -> None:
    def inner() -> None: ...

    with pytest.raises(InvalidNameError):
        Job.from_func(inner)
    with pytest.raises(InvalidNameError):
        Job.from_func(lambda: None)


def test_from_func_uses_import_path() -> None:
    from tests import jobs

    assert Job.from_func(jobs.add, kwargs={"a": 1}).func == "tests.jobs.add"


def test_queued_job_is_a_job() -> None:
    queued = QueuedJob(id=Reference(uuid.uuid4()), func="m.f")
    assert isinstance(queued, Job) and queued.state is QueuedJob.State.PENDING
    assert not queued.is_finished


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"concurrency": -2},
        {"tags": {"("}},
        {"state": "sleeping"},
        {"polling_interval": 0},
        {"rate_limit": 10},
        {"rate_limit": 0, "rate_limit_window": 1},
        {"resume_at": dt.datetime(2030, 1, 1)},
        {"executor": "nodots"},
        {"concurrency": 2**40},
        {"rate_limit": 2**40, "rate_limit_window": 1},
        {"executor_options": {"x": object()}},
    ],
)
def test_invalid_queue_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(QueueValidationError):
        Queue("q", **kwargs)  # type: ignore[arg-type]


def test_queue_name_and_tags() -> None:
    with pytest.raises(InvalidNameError):
        Queue("bad name")
    q = Queue("q", tags={"gpu-.*"})
    assert q.matches({"gpu-1"}) and not q.matches({"cpu"})
    assert Queue("q").matches({"anything"})
    assert Queue("q", executor=Queue).executor == "chancy.queue.Queue"


def test_queued_job_to_dict_is_json_ready() -> None:
    import json

    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    queued = QueuedJob(
        id=Reference(uuid.uuid4()),
        func="m.f",
        kwargs={"a": 1},
        limits=(Limit(Limit.Type.TIME, 3),),
        created_at=when,
    )
    data = json.loads(json.dumps(queued.to_dict()))
    assert data["func"] == "m.f" and data["kwargs"] == {"a": 1} and data["state"] == "pending"
    assert data["created_at"] == when.isoformat() and data["started_at"] is None
    assert data["limits"] == [{"type": "time", "value": 3}]
