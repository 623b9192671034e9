"""Migration 0002's fetch against 0003's on the same server, alternating.

``python -m bench.fetch_ab [--jobs 20000] [--batch 100] [--rounds 3]``

For each round and each version, a fresh schema migrated to that version gets a backlog
of no-op jobs (no keys, no rate limit); one connection then calls the fetch function
until the backlog is drained. Reports the mean time of one fetch per version and round:
the cost of what 0003 adds to a queue that uses neither keys nor rate limits.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import psycopg

from bench.db import base_dsn, schema_dsn
from chancy import Chancy


async def drain_ms_per_fetch(server: str, version: int, size: int, batch: int) -> float:
    schema = f"fab_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        app = Chancy(schema_dsn(server, schema))
        async with app:
            await app.migrate(to_version=version)
            async with app.pool.connection() as conn:
                # Plain SQL: the API of this version writes columns 0002 does not have.
                await conn.execute(
                    "INSERT INTO chancy_queues (name, executor) VALUES ('q', 'x.Executor')"
                )
                await conn.execute(
                    "INSERT INTO chancy_jobs (id, queue, func) "
                    "SELECT gen_random_uuid(), 'q', 'bench.jobs.noop' FROM generate_series(1, %s)",
                    (size,),
                )
                await conn.execute("ANALYZE")
            fetches = 0
            async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
                started = time.perf_counter()
                while True:
                    cur = await conn.execute(
                        "SELECT count(*) FROM chancy_fetch_jobs('q', 'w', %s)", (batch,)
                    )
                    row = await cur.fetchone()
                    fetches += 1
                    if not row or not row[0]:
                        break
                elapsed = time.perf_counter() - started
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return elapsed / fetches * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_ab")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    server = base_dsn(args.dsn)
    for round_ in range(1, args.rounds + 1):
        old = await drain_ms_per_fetch(server, 2, args.jobs, args.batch)
        new = await drain_ms_per_fetch(server, 3, args.jobs, args.batch)
        ratio = new / old
        print(f"round {round_}: 0002 {old:.2f} ms/fetch, 0003 {new:.2f} ms/fetch ({ratio:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
