"""Limits enforced by the fetch: rate limits, keyed concurrency, eager polling, and the
plans the fetch runs (all against the real database, several workers at once)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from chancy import Chancy, Job, Queue, QueuedJob, Worker
from chancy.errors import JobValidationError, QueueValidationError
from chancy.store import Claim, Store, arun
from tests.proc import worker_processes
from tests.test_worker import poll as worker_poll

ASYNC = Chancy.Executor.Async
#: A rate window no test run crosses (windows are aligned on multiples since the epoch).
LONG_WINDOW = 10**9


@contextlib.asynccontextmanager
async def workers(app: Chancy, count: int, **kwargs: Any) -> AsyncIterator[list[Worker]]:
    """``count`` workers, each with its own connections, serving until the block ends."""
    settings: dict[str, Any] = {
        "register_signal_handlers": False,
        "queue_change_poll_interval": 0.2,
        "heartbeat_poll_interval": 0.5,
        "heartbeat_timeout": 5,
        "shutdown_timeout": 5,
    }
    settings.update(kwargs)
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(Worker(app, worker_id=f"w{i}", **settings))
            for i in range(count)
        ]
        yield started


# The workers here share one queue's limits, so conditions can take a little longer.
poll = functools.partial(worker_poll, timeout=20)


async def claim(app: Chancy, queue: str, worker_id: str, limit: int) -> Claim:
    """One fetch on a connection of its own (as a worker runs it)."""
    async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
        return await arun(conn, app.store.claim_jobs(queue, worker_id, limit))


async def finish(app: Chancy, jobs: list[QueuedJob]) -> None:
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() WHERE id = ANY(%s)",
            ([j.id.uuid for j in jobs],),
        )


# -- validation -------------------------------------------------------------------------


def test_concurrency_key_is_validated_and_copied() -> None:
    job = Job(func="tests.jobs.noop", concurrency_key="customer:42")
    assert job.with_concurrency_key("customer:7").concurrency_key == "customer:7"
    assert job.concurrency_key == "customer:42"
    assert job.with_concurrency_key(None).concurrency_key is None
    for bad in ("", "x" * 1025, "a\x00b", 42):
        with pytest.raises(JobValidationError, match="concurrency_key"):
            Job(func="tests.jobs.noop", concurrency_key=bad)  # type: ignore[arg-type]


def test_queue_limits_are_validated() -> None:
    assert Queue("q").concurrency_key_limit == 1
    assert Queue("q", concurrency_key_limit=3).to_dict()["concurrency_key_limit"] == 3
    for bad in (0, -1, None, True, 2.5, 2**31):
        with pytest.raises(QueueValidationError, match="concurrency_key_limit"):
            Queue("q", concurrency_key_limit=bad)  # type: ignore[arg-type]
    with pytest.raises(QueueValidationError, match="go together"):
        Queue("q", rate_limit=5)
    with pytest.raises(QueueValidationError, match="rate_limit_window"):
        Queue("q", rate_limit=5, rate_limit_window=0)


async def test_settings_round_trip(chancy: Chancy) -> None:
    declared = Queue("q", rate_limit=5, rate_limit_window=60, concurrency_key_limit=2)
    await chancy.declare(declared)
    assert await chancy.get_queue("q") == declared
    await chancy.declare(Queue("q", concurrency_key_limit=4), upsert=True)
    stored = await chancy.get_queue("q")
    assert stored is not None
    assert stored.concurrency_key_limit == 4 and stored.rate_limit is None
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q", concurrency_key="c:1"))
    job = await chancy.get_job(ref)
    assert job is not None and job.concurrency_key == "c:1"
    assert job.to_dict()["concurrency_key"] == "c:1"


# -- rate limits ------------------------------------------------------------------------


async def test_concurrent_fetches_never_exceed_the_rate_budget(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", rate_limit=7, rate_limit_window=LONG_WINDOW))
    await chancy.push_detailed([Job(func="tests.jobs.noop", queue="q")] * 40)
    claims = await asyncio.gather(*(claim(chancy, "q", f"w{i}", 5) for i in range(12)))
    assert sum(len(c.jobs) for c in claims) == 7
    # Whoever took the last of the budget, and everyone after, learns when it reopens.
    spent = [c.rate_limited_for for c in claims if c.rate_limited_for is not None]
    assert spent and all(0 < s <= LONG_WINDOW for s in spent)
    later = await claim(chancy, "q", "late", 5)
    assert later.jobs == [] and later.rate_limited_for is not None
    # The limit applies to this queue only.
    await chancy.declare(Queue("other"))
    await chancy.push(Job(func="tests.jobs.noop", queue="other"))
    free = await claim(chancy, "other", "w", 5)
    assert len(free.jobs) == 1 and free.rate_limited_for is None


async def test_rate_limit_counts_per_fixed_window_across_workers(chancy: Chancy) -> None:
    window, limit, total = 1, 4, 14
    await chancy.declare(
        Queue(
            "rl",
            executor=ASYNC,
            concurrency=10,
            rate_limit=limit,
            rate_limit_window=window,
            polling_interval=0.1,
        )
    )
    pushed = await chancy.push_detailed([Job(func="tests.jobs.noop", queue="rl")] * total)
    async with workers(chancy, 3):
        done = await chancy.wait_for_jobs([p.reference for p in pushed], timeout=30, interval=0.1)
    assert [j.state for j in done] == ["succeeded"] * total
    per_window = collections.Counter(
        int(j.started_at.timestamp() // window) for j in done if j.started_at is not None
    )
    assert sum(per_window.values()) == total
    assert max(per_window.values()) <= limit
    assert len(per_window) >= -(-total // limit)


async def test_spent_window_makes_the_worker_wait_instead_of_polling(chancy: Chancy) -> None:
    await chancy.declare(
        Queue(
            "rl",
            executor=ASYNC,
            concurrency=10,
            rate_limit=2,
            rate_limit_window=LONG_WINDOW,
            polling_interval=0.05,
        )
    )
    calls: list[int] = []
    original = chancy.store.claim_jobs

    def counting(queue: str, worker_id: str, limit: int) -> Any:
        calls.append(limit)
        return original(queue, worker_id, limit)

    chancy.store.claim_jobs = counting  # type: ignore[method-assign]
    refs = [await chancy.push(Job(func="tests.jobs.noop", queue="rl")) for _ in range(5)]
    async with workers(chancy, 1):
        await poll(lambda: _count_succeeded(chancy, refs, 2))
        fetched = len(calls)
        # Pushes notify the worker; with the window spent, it must not fetch for them.
        for _ in range(5):
            refs.append(await chancy.push(Job(func="tests.jobs.noop", queue="rl")))
        await asyncio.sleep(1.0)  # an observation window: a polling loop would fetch ~20x
        assert len(calls) <= fetched + 1
        assert await _count_succeeded(chancy, refs, 2, exactly=True)
        # Lifting the limit ends the wait at once (not when the window reopens, years ahead).
        await chancy.declare(
            Queue("rl", executor=ASYNC, concurrency=10, polling_interval=0.05), upsert=True
        )
        await chancy.wait_for_jobs(refs, timeout=20)
    assert await _count_succeeded(chancy, refs, len(refs), exactly=True)


async def _count_succeeded(app: Chancy, refs: list[Any], n: int, *, exactly: bool = False) -> bool:
    jobs = await app.get_jobs(refs)
    count = sum(1 for j in jobs if j.state == "succeeded")
    return count == n if exactly else count >= n


# -- keyed concurrency ------------------------------------------------------------------


async def test_concurrent_fetches_respect_the_key_limit_in_fifo_order(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", concurrency_key_limit=2))
    pushed = await chancy.push_detailed(
        [
            Job(func="tests.jobs.noop", queue="q", concurrency_key=f"k{i % 5}", kwargs={"n": i})
            for i in range(60)
        ]
        + [Job(func="tests.jobs.noop", queue="q", kwargs={"free": i}) for i in range(6)]
    )
    assert all(p.inserted for p in pushed)
    claimed: list[QueuedJob] = []
    while True:  # rounds of 10 concurrent fetches until one round claims nothing
        claims = await asyncio.gather(*(claim(chancy, "q", f"w{i}", 4) for i in range(10)))
        got = [j for c in claims for j in c.jobs]
        if not got:
            break
        claimed.extend(got)
    by_key = collections.defaultdict(list)
    for job in claimed:
        by_key[job.concurrency_key].append(job.kwargs)
    assert len(by_key.pop(None)) == 6  # unkeyed jobs are not limited
    assert sorted(by_key) == [f"k{i}" for i in range(5)]
    for key, kwargs in by_key.items():
        first_two = [n for n in range(60) if f"k{n % 5}" == key][:2]
        assert sorted(k["n"] for k in kwargs) == first_two
    # A finished job frees one place of its key: the next one of that key (only) follows.
    k0 = [j for j in claimed if j.concurrency_key == "k0"]
    await finish(chancy, k0[:1])
    following = await claim(chancy, "q", "w", 10)
    assert [(j.concurrency_key, j.kwargs["n"]) for j in following.jobs] == [("k0", 10)]


async def test_a_busy_key_does_not_hold_up_other_keys(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    await chancy.push_detailed(
        [Job(func="tests.jobs.noop", queue="q", concurrency_key="big")] * 300
        + [Job(func="tests.jobs.noop", queue="q", concurrency_key="small")]
        + [Job(func="tests.jobs.noop", queue="q")]
    )
    first = await claim(chancy, "q", "w", 10)
    assert sorted(str(j.concurrency_key) for j in first.jobs) == ["None", "big", "small"]
    assert (await claim(chancy, "q", "w", 10)).jobs == []


async def test_a_fetch_locks_only_the_keys_it_can_claim_from(chancy: Chancy) -> None:
    # 300 keys, each with one job running and one waiting: the fetch walks past all the
    # waiting ones without taking a lock for each (the shared lock table is finite).
    await chancy.declare(Queue("q"))
    keyed = [Job(func="tests.jobs.noop", queue="q", concurrency_key=f"c{i}") for i in range(300)]
    await chancy.push_detailed(keyed)
    assert len((await claim(chancy, "q", "w", 300)).jobs) == 300
    await chancy.push_detailed([*keyed, Job(func="tests.jobs.noop", queue="q")])
    async with await psycopg.AsyncConnection.connect(chancy.dsn) as conn:
        got = await arun(conn, chancy.store.claim_jobs("q", "w", 10))
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        row = await cur.fetchone()
        await conn.rollback()
    assert [j.concurrency_key for j in got.jobs] == [None]
    assert row is not None and row[0] == 0


async def test_keys_are_limited_across_workers(chancy: Chancy) -> None:
    await chancy.declare(
        Queue("k", executor=ASYNC, concurrency=3, concurrency_key_limit=2, polling_interval=0.1)
    )
    jobs = [
        Job(
            func="tests.jobs.async_sleep",
            queue="k",
            kwargs={"seconds": 0.05},
            concurrency_key=f"customer:{i % 3}",
        )
        for i in range(36)
    ] + [Job(func="tests.jobs.async_sleep", queue="k", kwargs={"seconds": 0.05})] * 12
    refs = [r for b in [b async for b in chancy.push_many(jobs)] for r in b]
    async with workers(chancy, 3):
        done = await chancy.wait_for_jobs(refs, timeout=60, interval=0.1)
    assert [j.state for j in done] == ["succeeded"] * len(refs)
    by_key: dict[str | None, list[QueuedJob]] = collections.defaultdict(list)
    for job in done:
        by_key[job.concurrency_key].append(job)
    for key, members in by_key.items():
        if key is None:
            continue
        # In the database a job is running from its claim to its recorded outcome; no
        # instant ever sees more than two of one key between those two points.
        assert _max_overlap(members) <= 2, key
        # Jobs of one key start in the order they were pushed.
        assert [j.id for j in sorted(members, key=_start)] == sorted(
            (j.id for j in members), key=lambda r: r.uuid
        )
    assert len({j.taken_by for j in done}) > 1


def _start(job: QueuedJob) -> tuple[dt.datetime, str]:
    assert job.started_at is not None
    return job.started_at, str(job.id)


def _max_overlap(jobs: list[QueuedJob]) -> int:
    events: list[tuple[dt.datetime, int]] = []
    for job in jobs:
        assert job.started_at is not None and job.completed_at is not None
        events += [(job.started_at, 1), (job.completed_at, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


async def test_worker_processes_share_rate_and_key_limits(
    chancy: Chancy, python: str, subprocess_env: dict[str, str]
) -> None:
    # Three worker processes, two slots each: the six tenants need more than one of them,
    # and the limits hold for all of them together.
    await chancy.declare(
        Queue(
            "pk",
            executor=ASYNC,
            concurrency=2,
            polling_interval=0.2,
            rate_limit=5,
            rate_limit_window=1,
            concurrency_key_limit=1,
        )
    )
    jobs = [
        Job(
            func="tests.jobs.async_sleep",
            queue="pk",
            kwargs={"seconds": 0.3},
            concurrency_key=f"tenant:{i % 6}",
        )
        for i in range(18)
    ]
    with worker_processes(python, subprocess_env) as processes:
        for n in range(3):
            await processes.start(f"p{n}")
        pushed = await chancy.push_detailed(jobs)
        done = await chancy.wait_for_jobs([p.reference for p in pushed], timeout=60, interval=0.1)
    assert [j.state for j in done] == ["succeeded"] * len(jobs)
    per_window = collections.Counter(_start(j)[0].replace(microsecond=0) for j in done)
    assert max(per_window.values()) <= 5 and len(per_window) >= 4
    for tenant in range(6):
        mine = [j for j in done if j.concurrency_key == f"tenant:{tenant}"]
        assert _max_overlap(mine) == 1
        assert [j.id for j in sorted(mine, key=_start)] == sorted(
            (j.id for j in mine), key=lambda r: r.uuid
        )
    assert len({j.taken_by for j in done}) > 1


async def test_worker_fetches_the_next_job_of_a_key_when_one_finishes(dsn: str) -> None:
    # No notifications and a long poll: only the finished job can wake the fetch.
    app = Chancy(dsn, notifications=False)
    async with app:
        await app.migrate()
        await app.declare(Queue("k", executor=ASYNC, concurrency=5, polling_interval=60))
        refs = [
            await app.push(Job(func="tests.jobs.noop", queue="k", concurrency_key="serial"))
            for _ in range(4)
        ]
        async with workers(app, 1):
            done = await app.wait_for_jobs(refs, timeout=20, interval=0.1)
        assert [j.state for j in done] == ["succeeded"] * 4


# -- eager polling ----------------------------------------------------------------------


async def test_eager_polling_fetches_after_finished_jobs_are_recorded(dsn: str) -> None:
    app = Chancy(dsn, notifications=False)
    async with app:
        await app.migrate()
        await app.declare(
            Queue("e", executor=ASYNC, concurrency=5, polling_interval=60, eager_polling=True)
        )
        first = await app.push(Job(func="tests.jobs.async_sleep", queue="e", kwargs={"seconds": 1}))
        async with workers(app, 1):
            await poll(lambda: _is_state(app, first, "running"))
            # Not notified (notifications are off) and a minute before the next poll: it
            # is found because the worker fetches again once `first` is recorded.
            second = await app.push(Job(func="tests.jobs.noop", queue="e"))
            done = await app.wait_for_jobs([first, second], timeout=20)
        assert [j.state for j in done] == ["succeeded", "succeeded"]


async def _is_state(app: Chancy, ref: Any, state: str) -> bool:
    job = await app.get_job(ref)
    return job is not None and job.state == state


# -- plans ------------------------------------------------------------------------------


async def _nested_plans(app: Chancy, queue: str, limit: int = 10) -> str:
    """The plans of every statement the fetch function runs (auto_explain), rolled back."""
    notices: list[str] = []
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        await conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_level = notice",
        ):
            await conn.execute(f"SET {setting}")
        await arun(conn, Store().claim_jobs(queue, "explain", limit))
        await conn.rollback()
    return "\n".join(notices)


async def test_fetch_plans_walk_the_partial_indexes(chancy: Chancy) -> None:
    await chancy.declare(Queue("plain"))
    await chancy.declare(Queue("limited", rate_limit=100, rate_limit_window=60))
    await chancy.declare(Queue("keyed"))
    await chancy.push_detailed(
        [Job(func="tests.jobs.noop", queue="keyed", concurrency_key=f"c{i % 5}") for i in range(50)]
    )
    for name in ("plain", "limited", "keyed"):
        await chancy.push_detailed([Job(func="tests.jobs.noop", queue=name)] * 200)
    async with chancy.pool.connection() as conn:
        await conn.execute("ANALYZE chancy_jobs")
    plain = await _nested_plans(chancy, "plain")
    assert "Index Scan using chancy_jobs_fetch_idx" in plain
    assert "Seq Scan on chancy_jobs" not in plain and "Sort" not in plain
    # A queue without keyed jobs decides so with one probe of the (empty) keyed index.
    assert "chancy_jobs_keyed_waiting_idx" in plain
    limited = await _nested_plans(chancy, "limited")
    assert "Index Scan using chancy_jobs_fetch_idx" in limited
    assert "chancy_queue_rates_pkey" in limited
    keyed = await _nested_plans(chancy, "keyed")
    assert "Index Scan using chancy_jobs_fetch_idx" in keyed
    assert "chancy_jobs_keyed_running_idx" in keyed
    assert "Index Scan using chancy_jobs_pkey" in keyed
    assert "Seq Scan on chancy_jobs" not in keyed and "Sort" not in keyed
