"""A hand-written Postgres job queue in about a hundred lines: the baseline Chancy is
measured against. It does what a careful engineer would write in an afternoon and no more:
COPY for bulk pushes, one INSERT per transaction for single pushes, a batch fetch with
``FOR UPDATE SKIP LOCKED``, asyncio tasks for the jobs, one UPDATE to mark a batch done,
and LISTEN plus a 1 s poll to notice new work. No retries, no heartbeats, no recovery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

Handler = Callable[[dict[str, Any]], Awaitable[None]]

SCHEMA = """
CREATE TABLE raw_jobs (
    id bigserial PRIMARY KEY,
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    done_at timestamptz
);
CREATE INDEX raw_jobs_live_idx ON raw_jobs (id) WHERE state IN ('pending', 'running');
CREATE FUNCTION raw_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('raw_jobs_' || current_schema(), '');
    RETURN NULL;
END $$;
CREATE TRIGGER raw_jobs_pushed AFTER INSERT ON raw_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION raw_jobs_notify();
"""

PUSH = "INSERT INTO raw_jobs (payload) VALUES (%s)"
FETCH = """
UPDATE raw_jobs SET state = 'running', started_at = now()
WHERE id IN (
    SELECT id FROM raw_jobs WHERE state = 'pending' ORDER BY id LIMIT %s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, payload
"""
MARK_DONE = "UPDATE raw_jobs SET state = 'done', done_at = now() WHERE id = ANY(%s)"


async def install(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(SCHEMA)


async def push_one(conn: psycopg.AsyncConnection[Any], payload: dict[str, Any]) -> None:
    """One job, one transaction (``conn`` is in autocommit)."""
    await conn.execute(PUSH, (Jsonb(payload),))


async def push_copy(conn: psycopg.AsyncConnection[Any], payloads: Iterable[dict[str, Any]]) -> None:
    """Many jobs in one transaction with COPY."""
    async with conn.transaction(), conn.cursor() as cur:
        async with cur.copy("COPY raw_jobs (payload) FROM STDIN") as copy:
            for payload in payloads:
                await copy.write_row((json.dumps(payload),))


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def work(
    dsn: str, handler: Handler, stop: asyncio.Event, *, batch: int = 100, poll: float = 1.0
) -> None:
    """Fetch up to ``batch`` jobs, run them as tasks, mark them done; when the queue is
    empty wait for a NOTIFY or ``poll`` seconds. Returns once ``stop`` is set."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    listen = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    wake = asyncio.Event()

    async def listener() -> None:
        async for _ in listen.notifies():
            wake.set()

    try:
        row = await (await conn.execute("SELECT current_schema()")).fetchone()
        channel = f"raw_jobs_{row[0] if row else 'public'}"
        await listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        listening = asyncio.create_task(listener())
        while not stop.is_set():
            wake.clear()
            rows = await (await conn.execute(FETCH, (batch,))).fetchall()
            if rows:
                await asyncio.gather(*(handler(payload) for _, payload in rows))
                await conn.execute(MARK_DONE, ([job_id for job_id, _ in rows],))
            else:
                await _wait_any([wake, stop], poll)
        listening.cancel()
    finally:
        await conn.close()
        await listen.close()
