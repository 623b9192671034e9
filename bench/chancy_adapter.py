"""Drives Chancy through its public API for the scenarios: ``push`` in a loop, ``push_many``,
queues declared per executor, and a worker process running ``Worker(chancy)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from bench.system import System
from chancy import Chancy, Job, Queue

QUEUE = "bench"
FETCH_INDEX = "chancy_jobs_fetch_idx"


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the benchmark queue is declared. ``concurrency=None`` with ``tuned=False`` is
    the out-of-the-box queue: ``Queue(name, executor=...)`` and nothing else."""

    executor: Chancy.Executor
    func: str
    concurrency: int | None = None

    def queue(self) -> Queue:
        if self.concurrency is None:
            return Queue(QUEUE, executor=self.executor)
        return Queue(QUEUE, executor=self.executor, concurrency=self.concurrency)


ASYNC_TUNED = Variant(Chancy.Executor.Async, "bench.jobs.anoop", concurrency=200)
ASYNC_DEFAULT = Variant(Chancy.Executor.Async, "bench.jobs.anoop")
THREADED = Variant(Chancy.Executor.Threaded, "bench.jobs.noop")
PROCESS = Variant(Chancy.Executor.Process, "bench.jobs.noop")
STAMP_FUNC = "bench.jobs.astamp"


class ChancySystem(System):
    name = "chancy"
    # Each count matches a partial index's predicate (fetch, running): the harness polls
    # these every 50 ms, and one count over all live states was a parallel sequential
    # scan of the whole table (~90 ms with 1,000,000 finished rows), which slowed the
    # worker it was watching.
    live_sql = (
        "SELECT (SELECT count(*) FROM chancy_jobs WHERE state IN ('pending', 'retrying'))"
        " + (SELECT count(*) FROM chancy_jobs WHERE state = 'running')"
    )
    pending_sql = "SELECT count(*) FROM chancy_jobs WHERE state IN ('pending', 'retrying')"
    span_sql = (
        "SELECT count(*), min(started_at), max(completed_at) FROM chancy_jobs "
        "WHERE state = 'succeeded' AND completed_at >= %s"
    )
    latency_sql = """
        SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY d),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d)
        FROM (SELECT extract(epoch FROM started_at - created_at)::float8 AS d
              FROM chancy_jobs WHERE state = 'succeeded' AND completed_at >= %s) AS t
    """
    history_sql = """
        INSERT INTO chancy_jobs (id, queue, func, kwargs, state, attempts, created_at,
                                 scheduled_at, started_at, completed_at, taken_by)
        SELECT gen_random_uuid(), 'bench', 'bench.jobs.anoop', jsonb_build_object('n', g),
               'succeeded', 1, t, t, t, t, 'history'
        FROM generate_series(1, %s) AS g, (SELECT now() - interval '1 hour' AS t) AS c
    """

    future_sql = """
        INSERT INTO chancy_jobs (id, queue, func, kwargs, scheduled_at)
        SELECT gen_random_uuid(), 'bench', 'bench.jobs.anoop', jsonb_build_object('n', g),
               now() + interval '10 years'
        FROM generate_series(1, %s) AS g
    """
    delete_future_sql = (
        "DELETE FROM chancy_jobs "
        "WHERE state = 'pending' AND scheduled_at > now() + interval '1 year'"
    )

    def __init__(self, variant: Variant = ASYNC_TUNED) -> None:
        self.variant = variant
        self.chancy: Chancy | None = None

    async def open(self, dsn: str) -> None:
        self.chancy = Chancy(dsn)
        await self.chancy.__aenter__()
        await self.chancy.migrate()
        await self.chancy.declare(self.variant.queue())

    async def close(self) -> None:
        if self.chancy is not None:
            await self.chancy.__aexit__(None, None, None)

    async def push_one(self, kwargs: dict[str, Any], *, stamp: bool = False) -> None:
        assert self.chancy is not None
        func = STAMP_FUNC if stamp else self.variant.func
        await self.chancy.push(Job(func=func, queue=QUEUE, kwargs=kwargs))

    async def push_bulk(self, kwargs: list[dict[str, Any]], batch: int) -> None:
        assert self.chancy is not None
        jobs = (Job(func=self.variant.func, queue=QUEUE, kwargs=kw) for kw in kwargs)
        async for _ in self.chancy.push_many(jobs, batch_size=batch):
            pass

    def worker_args(self, dsn: str, *, stamp: bool = False) -> list[str]:
        return ["chancy", "--dsn", dsn]

    async def describe_fetch(self, conn: Any) -> dict[str, Any]:
        """EXPLAIN ANALYZE of the worker's own fetch statement, rolled back so that no job
        is claimed; reports whether the partial fetch index serves it."""
        assert self.chancy is not None
        query = self.chancy.store.q("fetch_jobs_many")
        params = {"queue": QUEUE, "worker_id": "bench-explain", "limit": 100}
        explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ") + query
        # The fetch is a function: auto_explain shows the plans of the statements inside it.
        nested: list[str] = []

        def collect(diagnostic: psycopg.errors.Diagnostic) -> None:
            nested.append(diagnostic.message_primary or "")

        conn.add_notice_handler(collect)
        try:
            async with conn.transaction(force_rollback=True):
                cur = psycopg.AsyncClientCursor(conn)
                try:
                    async with conn.transaction():
                        await cur.execute("LOAD 'auto_explain'")
                        # Transaction-local settings: the rollback switches them off again.
                        await cur.execute(
                            "SELECT set_config('auto_explain.log_min_duration', '0', true), "
                            "set_config('auto_explain.log_nested_statements', 'on', true), "
                            "set_config('auto_explain.log_analyze', 'on', true), "
                            "set_config('auto_explain.log_level', 'notice', true)"
                        )
                except psycopg.Error:
                    pass  # not a superuser: the outer plan only
                await cur.execute(explain, params)
                plan = "\n".join([*(row[0] for row in await cur.fetchall()), *nested])
        finally:
            conn.remove_notice_handler(collect)
        return {"plan": plan, "uses_fetch_index": FETCH_INDEX in plan}
