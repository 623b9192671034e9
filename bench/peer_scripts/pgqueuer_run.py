"""Measure pgqueuer (asyncpg driver): ``--op push_1txn|bulk_push|drain``; prints JSON.

Runs inside bench/.venvs/pgqueuer, so it imports nothing from Chancy or the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import time

import asyncpg
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode

ENTRYPOINT = "noop"


def payload(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


async def push_bulk(queries: Queries, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        size = min(batch, n - start)
        await queries.enqueue(
            [ENTRYPOINT] * size, [payload(start + i) for i in range(size)], [0] * size
        )


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's: it survives exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", help="unused: libpq form of --conn-json")
    parser.add_argument("--conn-json", required=True)
    parser.add_argument("--op", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    conn_kwargs = json.loads(args.conn_json)
    conn = await asyncpg.connect(**conn_kwargs)
    queries = Queries.from_asyncpg_connection(conn)
    await queries.install()
    result: dict[str, float | str] = {"version": importlib.metadata.version("pgqueuer")}
    if args.op == "push_1txn":
        for i in range(20):
            await queries.enqueue(ENTRYPOINT, payload(i))
        started = time.perf_counter()
        for i in range(args.n):
            await queries.enqueue(ENTRYPOINT, payload(i))
        result["jobs_per_s"] = args.n / (time.perf_counter() - started)
    elif args.op == "bulk_push":
        started = time.perf_counter()
        await push_bulk(queries, args.n, args.batch)
        result["jobs_per_s"] = args.n / (time.perf_counter() - started)
    elif args.op == "drain":
        await push_bulk(queries, args.n, 5000)
        worker_conn = await asyncpg.connect(**conn_kwargs)
        qm = QueueManager(Queries.from_asyncpg_connection(worker_conn))
        stamps: list[float] = []

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: object) -> None:
            stamps.append(time.perf_counter())

        started = time.perf_counter()
        await qm.run(batch_size=args.batch, mode=QueueExecutionMode.drain)
        wall = time.perf_counter() - started
        if len(stamps) != args.n:
            raise SystemExit(f"ran {len(stamps)} of {args.n} jobs")
        result["jobs_per_s"] = args.n / (stamps[-1] - stamps[0])
        result["wall_jobs_per_s"] = args.n / wall
        result["rss_peak_mb"] = peak_rss_mb()
    else:
        raise SystemExit(f"unknown op {args.op}")
    await conn.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
