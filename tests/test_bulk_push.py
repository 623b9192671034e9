"""push_many's streamed batches: jobs are read, checked, encoded and sent into a COPY one
at a time. What a batch stores, returns and refuses must match the one-statement push."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from chancy import Chancy, Job, Limit, Queue, QueuedJob
from chancy import store as store_module
from chancy.errors import JobArgumentsError, JobValidationError, UnknownQueueError
from chancy.job import Reference, uuid7
from chancy.store import Store, _orjson_dumps, _stdlib_dumps, dumps
from tests.test_bad_input import BAD_KWARGS, nested

N = store_module.COPY_MIN_JOBS
LATER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


async def count_jobs(app: Chancy) -> int:
    async with app.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {app.store.prefix}jobs")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def mixed(queue: str) -> list[Job]:
    """Plain jobs first (a plain COPY opens the batch), then jobs with every field set
    (it switches to full rows), with unique-key jobs, some sharing a key, in between."""
    jobs = []
    for i in range(3 * N):
        job = Job(func="tests.jobs.add", queue=queue, kwargs={"a": i, "b": "t\\ab\t\n"})
        if i >= 2 * N:
            job = dataclasses.replace(
                job,
                meta={"i": i},
                limits=[Limit(Limit.Type.TIME, 5)],
                priority=i % 5,
                max_attempts=2,
                scheduled_at=LATER if i % 2 else None,
                concurrency_key=f"k\\{i % 3}",
            )
        if i % 37 == 0:
            job = job.with_unique_key(f"key-{i // 74}")  # pairs of jobs share a key
        jobs.append(job)
    return jobs


async def test_streamed_batch_keeps_order_ids_and_unique_keys(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    live = await chancy.push(Job(func="tests.jobs.noop", queue="q", unique_key="key-0"))
    jobs = mixed("q")
    [refs] = [batch async for batch in chancy.push_many(jobs, batch_size=len(jobs))]
    assert len(refs) == len(jobs)
    stored = {j.id: j for j in await chancy.get_jobs(refs)}
    keyed: dict[str, Any] = {}
    for job, ref in zip(jobs, refs, strict=True):
        got = stored[ref]
        if job.unique_key is None:
            assert (got.kwargs, got.meta, got.priority, got.concurrency_key) == (
                json.loads(json.dumps(dict(job.kwargs))),
                job.meta,
                job.priority,
                job.concurrency_key,
            )
            assert got.scheduled_at == (LATER if job.scheduled_at else got.created_at)
            assert [limit.to_dict() for limit in got.limits] == [
                limit.to_dict() for limit in job.limits
            ]
        else:  # one job per key: the live one, or the first of the batch
            assert got.unique_key == job.unique_key
            assert keyed.setdefault(job.unique_key, ref) == ref
    assert keyed["key-0"] == live
    assert len(keyed) == len({j.unique_key for j in jobs if j.unique_key})
    # Ids follow the caller's order (FIFO), unique-key jobs included.
    inserted: list[Any] = []
    for ref in refs:
        if ref != live and ref not in inserted:
            inserted.append(ref)
    assert [r.uuid for r in inserted] == sorted(r.uuid for r in inserted)
    assert await count_jobs(chancy) == len(inserted) + 1


async def test_due_jobs_of_a_full_copy_are_due_at_the_transaction_start(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    jobs = [Job(func="tests.jobs.noop", queue="q", priority=1) for _ in range(N)]
    refs = [r async for batch in chancy.push_many(jobs, batch_size=N) for r in batch]
    stored = await chancy.get_jobs(refs)
    assert len(stored) == N
    assert all(job.scheduled_at == job.created_at for job in stored)


@pytest.mark.parametrize("where", [5, 2 * N + 3])
async def test_bad_job_fails_its_batch_only(chancy: Chancy, where: int) -> None:
    """Inside the first rows read or deep in the stream, a bad job fails its batch with
    the typed error naming the path; the batches before it stay, the pool stays usable."""
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    good = [Job(func="tests.jobs.noop", queue="q", kwargs={"i": i}) for i in range(3 * N)]
    jobs = good + good[:]
    jobs[3 * N + where] = Job(func="tests.jobs.echo", queue="q", kwargs={"x": {"y": {1, 2}}})
    pushed: list[list[Any]] = []
    with pytest.raises(JobArgumentsError) as caught:
        async for batch in chancy.push_many(jobs, batch_size=3 * N):
            pushed.append(batch)
    assert caught.value.path == "kwargs['x']['y']"
    assert "tests.jobs.echo" in str(caught.value)
    assert [len(b) for b in pushed] == [3 * N]
    assert await count_jobs(chancy) == 3 * N
    refs = [r async for batch in chancy.push_many(good, batch_size=3 * N) for r in batch]
    assert await count_jobs(chancy) == 6 * N and len(refs) == 3 * N


async def test_invalid_job_from_the_callers_iterator_fails_its_batch(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))

    def jobs() -> Iterator[Job]:
        for i in range(2 * N):
            yield Job(func="tests.jobs.noop", queue="q", kwargs={"i": i})
        yield Job(func="tests.jobs.noop", queue="q", priority=10**6)

    with pytest.raises(JobValidationError, match="priority"):
        async for _ in chancy.push_many(jobs(), batch_size=10 * N):
            pass
    not_jobs: list[Any] = [*jobs_list(2 * N), "nope"]
    with pytest.raises(JobValidationError, match="Job instances"):
        async for _ in chancy.push_many(not_jobs, batch_size=10 * N):
            pass
    assert await count_jobs(chancy) == 0


def jobs_list(n: int) -> list[Job]:
    return [Job(func="tests.jobs.noop", queue="q", kwargs={"i": i}) for i in range(n)]


async def test_unknown_queue_deep_in_the_stream_inserts_nothing(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    jobs = jobs_list(3 * N)
    jobs[2 * N] = Job(func="tests.jobs.noop", queue="nowhere")
    jobs[2 * N + 1] = Job(func="tests.jobs.noop", queue="nowhere2", unique_key="u")
    with pytest.raises(UnknownQueueError) as caught:
        async for _ in chancy.push_many(jobs, batch_size=3 * N):
            pass
    assert caught.value.queues == ["nowhere", "nowhere2"]
    assert await count_jobs(chancy) == 0


async def test_streamed_batches_notify_once_per_queue(chancy: Chancy, dsn: str) -> None:
    # The channel is per database: other schemas' events are told apart by queue name.
    a, b = "bulk-notify-a", "bulk-notify-b"
    await chancy.declare(Queue(a, executor=Chancy.Executor.Async))
    await chancy.declare(Queue(b, executor=Chancy.Executor.Async))
    jobs = [Job(func="tests.jobs.noop", queue=a if i % 2 else b) for i in range(2 * N)]
    jobs += [Job(func="tests.jobs.noop", queue=a, unique_key=f"u{i}") for i in range(3)]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {chancy.store.channel}")
        batches = [b async for b in chancy.push_many(jobs, batch_size=len(jobs))]
        events = [json.loads(n.payload) async for n in listener.notifies(timeout=1.0)]
    assert [len(b) for b in batches] == [len(jobs)]
    pushed = sorted(e["q"] for e in events if e.get("e") == "pushed" and e.get("q") in (a, b))
    assert pushed == [a, b]


def test_sync_streamed_batches(dsn: str) -> None:
    with Chancy(dsn) as app:
        app.sync_migrate()
        app.sync_declare(Queue("q", executor=Chancy.Executor.Async))
        jobs = mixed("q")
        batches = list(app.sync_push_many(jobs, batch_size=N + 7))
        assert [len(b) for b in batches] == [N + 7, N + 7, len(jobs) - 2 * (N + 7)]
        refs = [r for b in batches for r in b]
        stored = {j.id: j for j in app.sync_get_jobs(refs)}
        plain = [r for r, j in zip(refs, jobs, strict=True) if j.unique_key is None]
        assert [stored[r].kwargs["a"] for r in plain] == [
            i for i, j in enumerate(jobs) if j.unique_key is None
        ]
        # A key shared across two batches stays one job: the second batch finds it live.
        keys = {j.unique_key for j in jobs if j.unique_key}
        assert len(set(refs)) == len(plain) + len(keys) == len(stored)


async def test_custom_encoder_output_is_escaped_for_copy(dsn: str) -> None:
    """A json_dumps of the caller's may write whitespace that COPY must escape."""

    def pretty(value: Any) -> str:
        return json.dumps(value, indent=1)

    async with Chancy(dsn, json_dumps=pretty) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        jobs = [
            Job(func="tests.jobs.noop", queue="q", kwargs={"i": i, "s": "\\"}) for i in range(N)
        ]
        refs = [r async for b in app.push_many(jobs, batch_size=N) for r in b]
        stored = {j.id: j for j in await app.get_jobs(refs)}
        assert [stored[r].kwargs for r in refs] == [{"i": i, "s": "\\"} for i in range(N)]


@pytest.mark.parametrize("encoder", [_orjson_dumps, _stdlib_dumps])
def test_encode_input_matches_dumps(encoder: Any) -> None:
    """The fast path of encode_input gives dumps' output, and dumps' errors."""
    store = Store(json_dumps=encoder)
    good: list[dict[str, Any]] = [
        {},
        {"n": 1, "f": 0.5, "b": True, "none": None, "s": 'é\\"x', "l": [1, [2, {"k": "v"}]]},
        {"max": 2**63 - 1, "min": -(2**63), "t": (1, 2)},
        {"deep": nested(store_module.MAX_PAYLOAD_DEPTH - 1)},
    ]
    for value in good:
        assert store.encode_input(value, "kwargs", "m.f") == dumps(value, "kwargs of m.f", encoder)
    for name, make, path in BAD_KWARGS:
        value = make()
        with pytest.raises(JobArgumentsError) as expected:
            dumps(value, "kwargs of m.f", encoder)
        with pytest.raises(JobArgumentsError) as caught:
            store.encode_input(value, "kwargs", "m.f")
        assert (caught.value.path, str(caught.value)) == (
            expected.value.path,
            str(expected.value),
        ), name
        assert caught.value.path == path, name


def test_job_init_has_the_dataclass_signature() -> None:
    """Job.__init__ is written out (for speed): it must take exactly the fields, keyword
    only, with their defaults, and give each job fresh containers."""
    params = inspect.signature(Job).parameters
    fields = dataclasses.fields(Job)
    assert list(params) == [f.name for f in fields]
    for field in fields:
        param = params[field.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
        if field.default is not dataclasses.MISSING:
            assert param.default == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert repr(param.default) == "<factory>", field.name
        else:
            assert param.default is inspect.Parameter.empty, field.name
    first, second = Job(func="m.f"), Job(func="m.f")
    assert first == second
    assert first.kwargs == {} and first.meta == {} and first.limits == []
    assert first.kwargs is not second.kwargs and first.meta is not second.meta
    assert first.limits is not second.limits
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.func = "m.g"  # type: ignore[misc]
    queued = QueuedJob(func="m.f", id=Reference(uuid7()))
    assert queued.kwargs == {} and queued.limits == []


def test_sync_bad_job_fails_its_batch_only(dsn: str) -> None:
    with Chancy(dsn) as app:
        app.sync_migrate()
        app.sync_declare(Queue("q", executor=Chancy.Executor.Async))
        jobs = jobs_list(4 * N)
        jobs[3 * N] = Job(func="tests.jobs.echo", queue="q", kwargs={"x": [float("nan")]})
        pushed = []
        with pytest.raises(JobArgumentsError) as caught:
            for batch in app.sync_push_many(jobs, batch_size=2 * N):
                pushed.append(batch)
        assert caught.value.path == "kwargs['x'][0]"
        assert [len(b) for b in pushed] == [2 * N]
        assert len(app.sync_get_jobs([r for b in pushed for r in b])) == 2 * N
        # The pool's connection came back usable.
        again = [r for b in app.sync_push_many(jobs_list(N), batch_size=N) for r in b]
        assert len(app.sync_get_jobs(again)) == N
