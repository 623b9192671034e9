"""The scenarios: each measures one system (raw or Chancy) in a fresh scratch schema and
returns figures named by :class:`Metric` keys. Peers run the subset they support."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import chancy_adapter, jobs, stats
from bench.chancy_adapter import Variant
from bench.procs import WorkerProcess, running_worker
from bench.system import System


@dataclasses.dataclass(frozen=True)
class Sizes:
    push_n: int
    bulk_n: int
    bulk_batch: int
    drain_n: int
    pickup_samples: int
    history_n: int
    memory_n: int
    sustained_rate: float
    sustained_seconds: float


FULL = Sizes(
    push_n=5_000,
    bulk_n=100_000,
    bulk_batch=5_000,
    drain_n=10_000,
    pickup_samples=200,
    history_n=1_000_000,
    memory_n=1_000_000,
    sustained_rate=2_000,
    sustained_seconds=60,
)
QUICK = Sizes(
    push_n=200,
    bulk_n=2_000,
    bulk_batch=500,
    drain_n=400,
    pickup_samples=20,
    history_n=5_000,
    memory_n=5_000,
    sustained_rate=200,
    sustained_seconds=2,
)

#: The smallest sizes that still run every scenario and report every metric (the test
#: suite's smoke run): tens of jobs, a short history, one second of sustained load.
SMOKE = Sizes(
    push_n=30,
    bulk_n=200,
    bulk_batch=100,
    drain_n=40,
    pickup_samples=5,
    history_n=300,
    memory_n=100,
    sustained_rate=50,
    sustained_seconds=1,
)


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    higher_is_better: bool
    #: False for figures where a ratio to raw means nothing (a yes/no, a self-ratio).
    ratio: bool = True


@dataclasses.dataclass
class Env:
    """What a scenario gets: its scratch DSN, a monitoring connection, sizes, a log dir."""

    dsn: str
    conn: psycopg.AsyncConnection[Any]
    sizes: Sizes
    log_dir: Path
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    async def scalar(self, query: str, *params: Any) -> Any:
        cur = await self.conn.execute(query, params or None)
        row = await cur.fetchone()
        return row[0] if row else None

    async def row(self, query: str, *params: Any) -> tuple[Any, ...]:
        cur = await self.conn.execute(query, params or None)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    async def db_now(self) -> dt.datetime:
        return await self.scalar("SELECT clock_timestamp()")  # type: ignore[no-any-return]


Run = Callable[[Env, System], Awaitable[dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    metrics: tuple[Metric, ...]
    run: Run
    variant: Variant = chancy_adapter.ASYNC_TUNED
    #: The peer script operation that measures the same thing, if any.
    peer_op: str | None = None


# -- helpers ------------------------------------------------------------------------------


def payloads(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [{"n": offset + i} for i in range(n)]


def drain_timeout(n: int) -> float:
    return max(60.0, n / 50)


async def wait_drained(env: Env, system: System, worker: WorkerProcess, timeout: float) -> None:
    """Poll (cheaply, through the systems' partial indexes) until no job is live."""
    deadline = time.monotonic() + timeout
    while True:
        if not worker.alive():
            raise RuntimeError(f"worker exited early: {worker.tail()}")
        if await env.scalar(system.live_sql) == 0:
            return
        if time.monotonic() > deadline:
            left = await env.scalar(system.live_sql)
            raise RuntimeError(f"{left} jobs still live after {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def drain_rate(env: Env, system: System, n: int, label: str) -> float:
    """Start a worker on a backlog of ``n`` jobs already in the table; the rate is ``n`` over
    the database time from the first claim to the last completion (worker start-up is
    left out, for every system alike)."""
    since = await env.db_now()
    log = env.log_dir / f"{system.name}-{label}.log"
    worker = WorkerProcess(system.worker_args(env.dsn), log)
    await worker.start()
    try:
        await wait_drained(env, system, worker, drain_timeout(n))
        env.details[f"memory_{label}"] = worker.memory()
        count, first, last = await env.row(system.span_sql, since)
    finally:
        await worker.stop()
    if count != n:
        raise RuntimeError(f"{count} of {n} jobs finished")
    return float(n / max((last - first).total_seconds(), 1e-6))


# -- scenarios ----------------------------------------------------------------------------


async def push_one_per_txn(env: Env, system: System) -> dict[str, float]:
    for i in range(20):  # warm the pool and prepared statements
        await system.push_one({"n": -i})
    n = env.sizes.push_n
    started = time.perf_counter()
    for i in range(n):
        await system.push_one({"n": i})
    return {"jobs_per_s": n / (time.perf_counter() - started)}


async def bulk_push(env: Env, system: System) -> dict[str, float]:
    await system.push_bulk(payloads(20), 20)
    items = payloads(env.sizes.bulk_n)
    started = time.perf_counter()
    await system.push_bulk(items, env.sizes.bulk_batch)
    return {"jobs_per_s": env.sizes.bulk_n / (time.perf_counter() - started)}


async def drain(env: Env, system: System) -> dict[str, float]:
    n = env.sizes.drain_n
    await system.push_bulk(payloads(n), 5_000)
    rate = await drain_rate(env, system, n, "drain")
    memory = env.details["memory_drain"]
    return {
        "jobs_per_s": rate,
        "rss_peak_mb": memory["hwm_mb"],
        "tree_rss_mb": memory["tree_rss_mb"],
    }


async def worker_rss(env: Env, system: System) -> dict[str, float]:
    """RSS of the worker process measured from outside (/proc): idle after start-up, then
    the peak (VmHWM) and the current RSS after it drained a backlog pushed while running."""
    n = env.sizes.drain_n
    log = env.log_dir / f"{system.name}-rss.log"
    async with running_worker(system.worker_args(env.dsn), log) as worker:
        await asyncio.sleep(0.2 if env.sizes == SMOKE else 1.0)
        idle = worker.memory()
        await system.push_bulk(payloads(n), 5_000)
        await wait_drained(env, system, worker, drain_timeout(n))
        await asyncio.sleep(0.2)
        after = worker.memory()
    return {
        "rss_idle_mb": idle["rss_mb"],
        "rss_peak_mb": after["hwm_mb"],
        "rss_after_mb": after["rss_mb"],
    }


async def memory(env: Env, system: System) -> dict[str, float]:
    """Is the worker's memory flat? RSS idle on an empty table; with ``memory_n`` jobs
    waiting scheduled far in the future (inserted with SQL, left for a few polls); and
    after ``memory_n`` due jobs were pushed and processed (the future ones deleted
    first). The growth figures are each system's own ratios to its idle RSS."""
    n = env.sizes.memory_n
    log = env.log_dir / f"{system.name}-memory.log"
    settle_s = 0.3 if env.sizes == SMOKE else 3.0
    async with running_worker(system.worker_args(env.dsn), log) as worker:
        await asyncio.sleep(settle_s)
        idle = worker.memory()
        await env.conn.execute(system.future_sql, (n,))
        await asyncio.sleep(settle_s)
        future = worker.memory()
        await env.conn.execute(system.delete_future_sql)
        for start in range(0, n, 100_000):
            await system.push_bulk(payloads(min(100_000, n - start), start), 5_000)
            # Processed as they come: the backlog never holds more than one slice.
            await wait_drained(env, system, worker, drain_timeout(100_000))
        await asyncio.sleep(0.2)
        after = worker.memory()
    return {
        "rss_idle_mb": idle["rss_mb"],
        "rss_future_mb": future["rss_mb"],
        "rss_processed_mb": after["rss_mb"],
        "rss_peak_mb": after["hwm_mb"],
        "future_vs_idle": future["rss_mb"] / idle["rss_mb"],
        "processed_vs_idle": after["rss_mb"] / idle["rss_mb"],
    }


async def pickup(env: Env, system: System) -> dict[str, float]:
    """Idle worker; one job at a time. The job carries the wall-clock time taken just before
    the push call and, first thing when it runs, appends (now - sent) to a file: so the
    figure covers commit, NOTIFY, fetch and dispatch, and the harness's polling of the file
    does not enter it (same host, same clock)."""
    stamp_file = env.log_dir / f"{system.name}-pickup-{random.getrandbits(32):08x}.txt"
    stamp_file.write_text("")
    log = env.log_dir / f"{system.name}-pickup.log"
    warmup = 5
    samples: list[float] = []
    args = system.worker_args(env.dsn, stamp=True)
    async with running_worker(args, log, {jobs.STAMP_FILE_ENV: str(stamp_file)}) as worker:
        await asyncio.sleep(0.1 if env.sizes == SMOKE else 0.5)
        since = None
        for i in range(warmup + env.sizes.pickup_samples):
            await system.push_one({"sent": time.time()}, stamp=True)
            deadline = time.monotonic() + 10
            while True:
                lines = stamp_file.read_text().splitlines()
                if len(lines) > i:
                    break
                if time.monotonic() > deadline or not worker.alive():
                    raise RuntimeError(f"job {i} was not picked up in 10 s: {worker.tail()}")
                await asyncio.sleep(0.005)
            if i == warmup - 1:
                await asyncio.sleep(0.05)
                since = await env.db_now()
            if i >= warmup:
                samples.append(float(lines[i]) * 1000)
            # Let the worker write the outcome and go idle again before the next job.
            await asyncio.sleep(0.03 + random.random() * 0.02)
        # The same jobs seen by the database: push statement start to claim statement start.
        _, db_p50, db_p99, _ = await env.row(system.latency_sql, since)
    stamp_file.unlink(missing_ok=True)
    return {
        "p50_ms": stats.percentile(samples, 0.5),
        "p99_ms": stats.percentile(samples, 0.99),
        "db_p50_ms": db_p50 * 1000,
        "db_p99_ms": db_p99 * 1000,
    }


async def sustained(env: Env, system: System) -> dict[str, float]:
    """Push at a fixed offered rate (one bulk statement per 10 ms tick) while a worker
    runs; enqueue-to-start is ``started_at - created_at`` in database time for every job,
    the backlog is sampled every 100 ms."""
    rate, seconds = env.sizes.sustained_rate, env.sizes.sustained_seconds
    log = env.log_dir / f"{system.name}-sustained.log"
    async with running_worker(system.worker_args(env.dsn), log) as worker:
        since = await env.db_now()
        backlog_max = 0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal backlog_max
            async with await psycopg.AsyncConnection.connect(env.dsn, autocommit=True) as conn:
                while not stop.is_set():
                    cur = await conn.execute(system.pending_sql)
                    row = await cur.fetchone()
                    backlog_max = max(backlog_max, row[0] if row else 0)
                    await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        pushed = 0
        started = time.perf_counter()
        try:
            while (elapsed := time.perf_counter() - started) < seconds:
                due = int(rate * elapsed) - pushed
                if due > 0:
                    await system.push_bulk(payloads(due, pushed), due)
                    pushed += due
                await asyncio.sleep(0.01)
            offered = pushed / (time.perf_counter() - started)
            await wait_drained(env, system, worker, drain_timeout(pushed))
        finally:
            stop.set()
            await sampler
    count, p50, p99, worst = await env.row(system.latency_sql, since)
    if count != pushed:
        raise RuntimeError(f"{count} of {pushed} jobs finished")
    return {
        "offered_per_s": offered,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": worst * 1000,
        "max_backlog": float(backlog_max),
    }


async def history(env: Env, system: System) -> dict[str, float]:
    """Drain rate on an empty table, then with ``history_n`` finished jobs in it (inserted
    with SQL, then VACUUM ANALYZE as autovacuum would have done), and the plan of the
    fetch statement at that point."""
    n = env.sizes.drain_n
    await system.push_bulk(payloads(n), 5_000)
    empty = await drain_rate(env, system, n, "history-empty")
    started = time.perf_counter()
    await env.conn.execute(system.history_sql, (env.sizes.history_n,))
    await env.conn.execute("VACUUM ANALYZE")
    env.details["history_insert_s"] = time.perf_counter() - started
    await system.push_bulk(payloads(n), 5_000)
    figures: dict[str, float] = {}
    plan = await system.describe_fetch(env.conn)
    if plan:
        env.details["fetch_plan"] = plan["plan"]
        figures["uses_fetch_index"] = float(plan["uses_fetch_index"])
    full = await drain_rate(env, system, n, "history-full")
    figures.update(
        {"jobs_per_s_empty": empty, "jobs_per_s_history": full, "history_vs_empty": full / empty}
    )
    return figures


# -- the catalogue ------------------------------------------------------------------------

RATE = Metric("jobs_per_s", "jobs/s", True)
PEAK = Metric("rss_peak_mb", "MiB", False)
TREE = Metric("tree_rss_mb", "MiB", False)
DRAIN_METRICS = (RATE, PEAK)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("push_1txn", "push one job per transaction, in a loop", (RATE,), push_one_per_txn,
             peer_op="push_1txn"),
    Scenario("bulk_push", "push_many (raw: COPY), batch of bulk_batch", (RATE,), bulk_push,
             peer_op="bulk_push"),
    Scenario("drain_async", "drain a no-op backlog, AsyncExecutor, concurrency 200",
             DRAIN_METRICS, drain, peer_op="drain"),
    Scenario("drain_async_default", "drain, Queue(executor=Async) with default settings",
             DRAIN_METRICS, drain, chancy_adapter.ASYNC_DEFAULT),
    Scenario("drain_threaded", "drain, ThreadedExecutor with default settings",
             DRAIN_METRICS, drain, chancy_adapter.THREADED),
    Scenario("drain_process", "drain, ProcessExecutor (the default executor)",
             (*DRAIN_METRICS, TREE), drain, chancy_adapter.PROCESS),
    Scenario("pickup", "enqueue-to-start latency of an idle worker, one job at a time",
             (Metric("p50_ms", "ms", False), Metric("p99_ms", "ms", False),
              Metric("db_p50_ms", "ms", False), Metric("db_p99_ms", "ms", False)), pickup),
    Scenario("worker_rss", "worker RSS from /proc: idle, peak and after draining",
             (Metric("rss_idle_mb", "MiB", False), Metric("rss_peak_mb", "MiB", False),
              Metric("rss_after_mb", "MiB", False)), worker_rss),
    Scenario("memory", "worker RSS with memory_n future jobs waiting, after memory_n done",
             (Metric("rss_idle_mb", "MiB", False), Metric("rss_future_mb", "MiB", False),
              Metric("rss_processed_mb", "MiB", False), Metric("rss_peak_mb", "MiB", False),
              Metric("future_vs_idle", "x", False, ratio=False),
              Metric("processed_vs_idle", "x", False, ratio=False)), memory),
    Scenario("history", "drain with history_n finished jobs vs an empty table",
             (Metric("jobs_per_s_empty", "jobs/s", True),
              Metric("jobs_per_s_history", "jobs/s", True),
              Metric("history_vs_empty", "x", True, ratio=False),
              Metric("uses_fetch_index", "bool", True, ratio=False)), history),
    Scenario("sustained", "push at a fixed rate while working: latency and backlog",
             (Metric("offered_per_s", "jobs/s", True, ratio=False), Metric("p50_ms", "ms", False),
              Metric("p99_ms", "ms", False), Metric("max_ms", "ms", False),
              Metric("max_backlog", "jobs", False)), sustained),
)  # fmt: skip
