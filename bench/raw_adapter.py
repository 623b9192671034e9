"""Drives the hand-written baseline queue (:mod:`bench.raw`) for the scenarios."""

from __future__ import annotations

from typing import Any

import psycopg

from bench import raw
from bench.system import System


class RawSystem(System):
    name = "raw"
    live_sql = "SELECT count(*) FROM raw_jobs WHERE state IN ('pending', 'running')"
    pending_sql = "SELECT count(*) FROM raw_jobs WHERE state = 'pending'"
    span_sql = (
        "SELECT count(*), min(started_at), max(done_at) FROM raw_jobs "
        "WHERE state = 'done' AND done_at >= %s"
    )
    latency_sql = """
        SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY d),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d)
        FROM (SELECT extract(epoch FROM started_at - created_at)::float8 AS d
              FROM raw_jobs WHERE state = 'done' AND done_at >= %s) AS t
    """
    history_sql = """
        INSERT INTO raw_jobs (payload, state, created_at, started_at, done_at)
        SELECT jsonb_build_object('n', g), 'done', now() - interval '1 hour',
               now() - interval '1 hour', now() - interval '1 hour'
        FROM generate_series(1, %s) AS g
    """

    # The baseline has no scheduling: a waiting state its fetch never looks at stands in.
    future_sql = """
        INSERT INTO raw_jobs (payload, state)
        SELECT jsonb_build_object('n', g), 'later' FROM generate_series(1, %s) AS g
    """
    delete_future_sql = "DELETE FROM raw_jobs WHERE state = 'later'"

    def __init__(self) -> None:
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self, dsn: str) -> None:
        self.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await raw.install(self.conn)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def push_one(self, kwargs: dict[str, Any], *, stamp: bool = False) -> None:
        assert self.conn is not None
        await raw.push_one(self.conn, kwargs)

    async def push_bulk(self, kwargs: list[dict[str, Any]], batch: int) -> None:
        assert self.conn is not None
        for start in range(0, len(kwargs), batch):
            await raw.push_copy(self.conn, kwargs[start : start + batch])

    def worker_args(self, dsn: str, *, stamp: bool = False) -> list[str]:
        return ["raw", "--dsn", dsn, "--job", "stamp" if stamp else "noop"]
