"""Entry point of a benchmarked worker process (``python -m bench.worker_main``).

The harness starts one per measurement so that the worker's memory and CPU are its own;
the process prints ``ready`` once it serves and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from bench import jobs, raw


async def run_raw(dsn: str, job: str, batch: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def handler(payload: dict[str, Any]) -> None:
        if job == "stamp":
            await jobs.astamp(**payload)
        else:
            await jobs.anoop(**payload)

    worker = asyncio.create_task(raw.work(dsn, handler, stop, batch=batch))
    await asyncio.sleep(0.2)  # connected and listening (or failed) by now
    if worker.done():
        await worker
    print("ready", flush=True)
    await worker


async def run_chancy(dsn: str) -> None:
    from chancy import Chancy, Worker

    async with Chancy(dsn) as chancy, Worker(chancy) as worker:
        print("ready", flush=True)
        await worker.wait_for_shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_main")
    parser.add_argument("system", choices=["raw", "chancy"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--job", choices=["noop", "stamp"], default="noop")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    if args.system == "raw":
        asyncio.run(run_raw(args.dsn, args.job, args.batch))
    else:
        asyncio.run(run_chancy(args.dsn))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
