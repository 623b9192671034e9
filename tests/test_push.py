"""Pushing jobs: forms, validation before SQL, transactions, uniqueness, bulk."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest

from chancy import Chancy, Job, Limit, Queue, QueuedJob, Reference
from chancy.errors import (
    JobArgumentsError,
    JobValidationError,
    NotConnectedError,
    UnknownQueueError,
)


@pytest.fixture
async def app(chancy: Chancy) -> Chancy:
    await chancy.declare(Queue("default"))
    await chancy.declare(Queue("other"))
    return chancy


async def test_push_forms_and_stored_fields(app: Chancy) -> None:
    when = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    job = Job(
        func="tests.jobs.add",
        kwargs={"a": 1, "b": [1, "x", None]},
        priority=7,
        max_attempts=4,
        scheduled_at=when,
        limits=[Limit(Limit.Type.TIME, 2.5), Limit(Limit.Type.MEMORY, 10**8)],
        meta={"m": {"n": 1}},
    )
    ref = await app.push("other", job)
    assert isinstance(ref, Reference)
    stored = await app.get_job(ref)
    assert stored is not None
    assert stored.queue == "other" and stored.func == "tests.jobs.add"
    assert stored.kwargs == {"a": 1, "b": [1, "x", None]} and stored.meta == {"m": {"n": 1}}
    assert stored.priority == 7 and stored.max_attempts == 4 and stored.attempts == 0
    assert stored.scheduled_at == when and stored.state is QueuedJob.State.PENDING
    assert stored.limits == [Limit(Limit.Type.TIME, 2.5), Limit(Limit.Type.MEMORY, 10**8)]
    assert stored.id.uuid.version == 7
    ref2 = await app.push(job.with_queue("default"))
    assert (await app.get_job(ref2)).queue == "default"  # type: ignore[union-attr]


async def test_unknown_queue_is_refused_and_names_the_queue(app: Chancy) -> None:
    with pytest.raises(UnknownQueueError, match="'nope'") as info:
        await app.push("nope", Job(func="tests.jobs.noop"))
    assert info.value.queues == ["nope"]
    with pytest.raises(UnknownQueueError):
        async for _ in app.push_many([Job(func="tests.jobs.noop"), Job(func="m.f", queue="x")]):
            pass
    async with app.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM chancy_jobs")
        assert (await cur.fetchone()) == (0,)


async def test_unknown_queue_check_can_be_disabled(dsn: str) -> None:
    async with Chancy(dsn, require_declared_queues=False) as app:
        await app.migrate()
        ref = await app.push("undeclared", Job(func="tests.jobs.noop"))
        assert (await app.get_job(ref)) is not None


async def test_bad_input_leaves_callers_transaction_usable(app: Chancy, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            await conn.execute("CREATE TABLE orders (id int)")
            with pytest.raises(JobArgumentsError, match="kwargs"):
                await app.push_ex(conn, Job(func="m.f", kwargs={"when": dt.datetime.now()}))
            with pytest.raises(JobArgumentsError):
                await app.push_ex(conn, Job(func="m.f", kwargs={"x": float("nan")}))
            with pytest.raises(JobArgumentsError, match="meta"):
                await app.push_ex(conn, Job(func="m.f", meta={"o": object()}))
            with pytest.raises(UnknownQueueError):
                await app.push_ex(conn, Job(func="m.f", queue="missing"))
            await conn.execute("INSERT INTO orders VALUES (1)")
            ref = await app.push_ex(conn, Job(func="m.f"))
        cur = await conn.execute("SELECT count(*) FROM orders")
        assert (await cur.fetchone()) == (1,)
    assert (await app.get_job(ref)) is not None


async def test_push_ex_is_transactional(app: Chancy, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("BEGIN")
        async with conn.cursor() as cur:
            ref = await app.push_ex(cur, Job(func="tests.jobs.noop"))
        # Not visible to others before commit.
        assert await app.get_job(ref) is None
        await conn.rollback()
        assert await app.get_job(ref) is None
        async with conn.transaction():
            ref = await app.push_ex(conn, Job(func="tests.jobs.noop"))
            refs = await app.push_many_ex(conn, [Job(func="tests.jobs.noop")] * 3)
            assert await app.get_job(ref) is None
    assert await app.get_job(ref) is not None
    assert len(await app.get_jobs(refs)) == 3


def test_sync_push_ex_is_transactional(app: Chancy, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        ref = app.sync_push_ex(conn.cursor(), Job(func="tests.jobs.noop"))
        refs = app.sync_push_many_ex(conn, [Job(func="tests.jobs.noop")] * 2)
        conn.rollback()
    with app:
        assert app.sync_get_job(ref) is None
        assert app.sync_get_jobs(refs) == []
        with psycopg.connect(dsn) as conn:
            ref = app.sync_push_ex(conn, Job(func="tests.jobs.noop"))
        assert app.sync_get_job(ref) is not None


async def test_unique_key_returns_live_job(app: Chancy) -> None:
    job = Job(func="tests.jobs.noop", unique_key="report-1")
    first = await app.push(job)
    again = await app.push(job.with_kwargs(x=1))
    assert first == again
    detailed = await app.push_detailed([job, job.with_unique_key("report-2")])
    assert [r.inserted for r in detailed] == [False, True]
    assert detailed[0].reference == first
    # A finished job frees its key.
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() WHERE id = %s",
            (first.uuid,),
        )
    assert await app.push(job) != first


async def test_unique_keys_inside_one_batch_collapse(app: Chancy) -> None:
    jobs = [Job(func="tests.jobs.noop", unique_key=f"k{i % 3}") for i in range(9)]
    results = await app.push_detailed(jobs)
    assert len({r.reference for r in results}) == 3
    assert sum(r.inserted for r in results) == 3
    assert results[0].reference == results[3].reference == results[6].reference


async def test_concurrent_pushes_of_one_unique_key_make_one_job(app: Chancy) -> None:
    job = Job(func="tests.jobs.noop", unique_key="race")
    refs = await asyncio.gather(*(app.push(job) for _ in range(20)))
    assert len(set(refs)) == 1


async def test_push_many_batches_and_order(app: Chancy) -> None:
    jobs = [Job(func="tests.jobs.add", kwargs={"a": i, "b": 0}) for i in range(25)]
    batches = [batch async for batch in app.push_many(jobs, batch_size=10)]
    assert [len(b) for b in batches] == [10, 10, 5]
    refs = [r for b in batches for r in b]
    stored = {j.id: j for j in await app.get_jobs(refs)}
    assert [stored[r].kwargs["a"] for r in refs] == list(range(25))


def test_sync_push_many(app: Chancy) -> None:
    with app:
        batches = list(app.sync_push_many([Job(func="tests.jobs.noop")] * 5, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]


async def test_push_argument_errors(app: Chancy) -> None:
    with pytest.raises(JobValidationError):
        await app.push("default")  # type: ignore[call-overload]
    with pytest.raises(JobValidationError):
        await app.push({"func": "m.f"})  # type: ignore[call-overload]
    with pytest.raises(JobValidationError):
        await app.push(Job(func="m.f"), Job(func="m.f"))  # type: ignore[call-overload]


async def test_methods_need_an_open_pool(dsn: str) -> None:
    app = Chancy(dsn)
    with pytest.raises(NotConnectedError):
        await app.push(Job(func="m.f"))
    with pytest.raises(NotConnectedError):
        app.sync_push(Job(func="m.f"))


async def test_django_style_dsn(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    databases = {
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "OPTIONS": {"options": params["options"]},
    }
    async with Chancy(databases) as app:
        await app.migrate()
        assert await app.is_up_to_date()


async def test_get_jobs_and_missing(app: Chancy) -> None:
    ref = await app.push(Job(func="tests.jobs.noop"))
    other = Reference("018f0000-0000-7000-8000-000000000000")
    assert await app.get_job(other) is None
    assert [j.id for j in await app.get_jobs([ref, other])] == [ref]


async def test_wait_for_job_returns_none_when_deleted_and_times_out(app: Chancy) -> None:
    ref = await app.push(Job(func="tests.jobs.noop"))
    with pytest.raises(TimeoutError):
        await app.wait_for_job(ref, timeout=0.05)
    async with app.pool.connection() as conn:
        await conn.execute("DELETE FROM chancy_jobs WHERE id = %s", (ref.uuid,))
    assert await app.wait_for_job(ref, timeout=5) is None


async def test_wait_for_job_custom_states(app: Chancy) -> None:
    ref = await app.push(Job(func="tests.jobs.noop"))
    job = await app.wait_for_job(ref, states=["pending"], timeout=1)
    assert job is not None and job.state == "pending"


async def test_bulk_push_mixed_fields_round_trip(app: Chancy) -> None:
    from chancy.job import PRIORITY_MAX, PRIORITY_MIN

    when = dt.datetime(2032, 1, 1, tzinfo=dt.UTC)
    jobs = [
        Job(func="tests.jobs.noop", priority=PRIORITY_MAX),
        Job(func="tests.jobs.noop", priority=PRIORITY_MIN, scheduled_at=when),
        Job(func="tests.jobs.noop", unique_key="mixed", meta={"k": [1, 2]}),
        Job(func="tests.jobs.noop", kwargs={"s": "é\u0000x"[:1] + "quote'\"{},"}),
    ]
    refs = [r.reference for r in await app.push_detailed(jobs)]
    stored = {j.id: j for j in await app.get_jobs(refs)}
    got = [stored[r] for r in refs]
    assert [j.priority for j in got] == [PRIORITY_MAX, PRIORITY_MIN, 0, 0]
    assert got[1].scheduled_at == when and got[2].unique_key == "mixed"
    assert got[2].meta == {"k": [1, 2]} and got[3].kwargs == jobs[3].kwargs


async def test_declare_ex_in_callers_transaction(chancy: Chancy, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            queue = await chancy.declare_ex(conn, Queue("tx", concurrency=2))
            assert queue.concurrency == 2
            ref = await chancy.push_ex(conn, Job(func="tests.jobs.noop", queue="tx"))
            assert await chancy.get_queue("tx") is None  # not committed yet
    assert (await chancy.get_queue("tx")) is not None
    assert (await chancy.get_job(ref)) is not None
    with psycopg.connect(dsn) as sync_conn:
        same = chancy.sync_declare_ex(sync_conn, Queue("tx", concurrency=5))
        assert same.concurrency == 2  # no upsert: the stored queue wins
        changed = chancy.sync_declare_ex(sync_conn, Queue("tx", concurrency=5), upsert=True)
        assert changed.concurrency == 5


async def test_nul_in_kwargs_is_refused_before_sql(app: Chancy, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            with pytest.raises(JobArgumentsError, match="NUL"):
                await app.push_ex(conn, Job(func="m.f", kwargs={"s": "a\x00b"}))
            with pytest.raises(JobArgumentsError, match="NUL"):
                await app.push_ex(conn, Job(func="m.f", meta={"s": "\x00"}))
            # A literal backslash-u0000 is ordinary text and round-trips.
            ref = await app.push_ex(conn, Job(func="m.f", kwargs={"s": "\\u0000"}))
    stored = await app.get_job(ref)
    assert stored is not None and stored.kwargs == {"s": "\\u0000"}


async def test_typed_errors_for_bad_arguments(app: Chancy) -> None:
    from chancy.errors import ChancyError

    ref = await app.push(Job(func="tests.jobs.noop"))
    with pytest.raises(ChancyError):
        await app.wait_for_job(ref, states=["bogus"], timeout=1)
    with pytest.raises(ChancyError):
        await app.pause_queue("default", resume_at="2030-01-01")  # type: ignore[arg-type]
    with pytest.raises(ChancyError):
        await app.migrate(to_version=99)
