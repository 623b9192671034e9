"""Measure procrastinate (psycopg 3 connector): ``--op push_1txn|bulk_push|drain``;
prints JSON. Runs inside bench/.venvs/procrastinate and imports only procrastinate."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import time

from procrastinate import App, PsycopgConnector

QUEUE = "bench"


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's: it survives exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--conn-json", help="unused: asyncpg-style parameters")
    parser.add_argument("--op", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = App(connector=PsycopgConnector(conninfo=args.dsn))
    stamps: list[float] = []

    @app.task(name="noop", queue=QUEUE)
    async def noop(n: int) -> None:
        stamps.append(time.perf_counter())

    async def push_bulk(n: int, batch: int) -> None:
        for start in range(0, n, batch):
            await noop.batch_defer_async(*({"n": i} for i in range(start, min(n, start + batch))))

    result: dict[str, float | str] = {"version": importlib.metadata.version("procrastinate")}
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        if args.op == "push_1txn":
            for i in range(20):
                await noop.defer_async(n=i)
            started = time.perf_counter()
            for i in range(args.n):
                await noop.defer_async(n=i)
            result["jobs_per_s"] = args.n / (time.perf_counter() - started)
        elif args.op == "bulk_push":
            started = time.perf_counter()
            await push_bulk(args.n, args.batch)
            result["jobs_per_s"] = args.n / (time.perf_counter() - started)
        elif args.op == "drain":
            await push_bulk(args.n, 5000)
            started = time.perf_counter()
            await app.run_worker_async(
                queues=[QUEUE],
                concurrency=args.concurrency,
                wait=False,
                install_signal_handlers=False,
            )
            wall = time.perf_counter() - started
            if len(stamps) != args.n:
                raise SystemExit(f"ran {len(stamps)} of {args.n} jobs")
            result["jobs_per_s"] = args.n / (stamps[-1] - stamps[0])
            result["wall_jobs_per_s"] = args.n / wall
            result["rss_peak_mb"] = peak_rss_mb()
        else:
            raise SystemExit(f"unknown op {args.op}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
