"""Fetch throughput with and without the limits the fetch enforces, in one run.

``python -m bench.fetch_limits [--jobs 10000] [--batch 100] [--dsn DSN]``

Each variant gets a fresh schema, a backlog of ``--jobs`` no-op jobs, and one loop that
claims ``--batch`` jobs and records them as succeeded in the same round trip (as a worker
does), until the backlog is drained. It reports claimed jobs per second and the median
and 99th percentile time of one fetch. Variants:

- ``plain``: no limits (the single-statement fetch);
- ``rate``: a rate limit that is never reached (the cost of the counter row);
- ``keys``: every job has a concurrency key, 10 jobs per key, 1 running per key;
- ``mixed``: half the jobs keyed as in ``keys``;
- ``hot_key``: half the backlog is one key at the head of the queue, the rest unkeyed
  behind it (every fetch walks past the blocked key's jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import psycopg

from bench.db import base_dsn, schema_dsn
from chancy import Chancy, Job, Queue
from chancy.store import Outcome, arun_pipelined

VARIANTS = ("plain", "rate", "keys", "mixed", "hot_key")


def backlog(variant: str, size: int) -> list[Job]:
    job = Job(func="bench.jobs.noop", queue="q")
    if variant in ("plain", "rate"):
        return [job] * size
    if variant == "keys":
        return [job.with_concurrency_key(f"k{i // 10}") for i in range(size)]
    if variant == "mixed":
        return [job.with_concurrency_key(f"k{i // 10}") if i % 2 else job for i in range(size)]
    hot = size // 2
    return [job.with_concurrency_key("hot")] * hot + [job] * (size - hot)


async def run_variant(server: str, variant: str, size: int, batch: int) -> dict[str, Any]:
    schema = f"fl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        app = Chancy(schema_dsn(server, schema))
        async with app:
            await app.migrate()
            rate: dict[str, Any] = {}
            if variant == "rate":
                rate = {"rate_limit": 10**9, "rate_limit_window": 3600}
            await app.declare(Queue("q", **rate))
            async for _ in app.push_many(backlog(variant, size), batch_size=5000):
                pass
            async with app.pool.connection() as conn:
                await conn.execute("ANALYZE")
            claimed = 0
            timings: list[float] = []
            outcomes: list[Outcome] = []
            hot_done = 0
            async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
                started = time.perf_counter()
                while True:
                    t0 = time.perf_counter()
                    _, claim = await arun_pipelined(
                        conn,
                        [
                            app.store.complete_jobs("bench", outcomes),
                            app.store.claim_jobs("q", "bench", batch),
                        ],
                    )
                    timings.append(time.perf_counter() - t0)
                    if not claim.jobs:
                        break
                    claimed += len(claim.jobs)
                    hot_done += sum(1 for j in claim.jobs if j.concurrency_key == "hot")
                    outcomes = [Outcome(j, "succeeded") for j in claim.jobs]
                elapsed = time.perf_counter() - started
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    timings.sort()
    return {
        "variant": variant,
        "claimed": claimed,
        "fetches": len(timings),
        "jobs_per_s": claimed / elapsed,
        "fetch_p50_ms": statistics.median(timings) * 1000,
        "fetch_p99_ms": timings[int(len(timings) * 0.99) - 1] * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_limits")
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--dsn")
    parser.add_argument("--only", nargs="*", choices=VARIANTS)
    args = parser.parse_args()
    server = base_dsn(args.dsn)
    print(f"{'variant':<9} {'claimed':>7} {'fetches':>7} {'jobs/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for variant in args.only or VARIANTS:
        r = await run_variant(server, variant, args.jobs, args.batch)
        print(
            f"{r['variant']:<9} {r['claimed']:>7} {r['fetches']:>7} {r['jobs_per_s']:>9,.0f} "
            f"{r['fetch_p50_ms']:>8.2f} {r['fetch_p99_ms']:>8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
