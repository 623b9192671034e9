"""One real Chancy worker process for the acceptance tests.

``python -m tests.worker_main --worker-id w1 [options]`` builds a Chancy from the DSN in
``CHANCY_TEST_DSN_SCHEMA`` (every connection carries ``application_name=acc:<worker id>``
so that tests can find and terminate its backends), optionally declares queues and runs
``Worker(...).start()`` until a signal stops it. It prints one line per event that tests
wait on, each with the system-wide monotonic clock (comparable across processes)::

    READY <worker_id> <pid> <t>        the worker is serving
    LEADER gained|lost <worker_id> <t>
    COMPLETED <job_id> <state> <t>     an outcome was queued for recording
    RECOVERED <job_id> <state> <t>     this worker's Recovery handed back a job
    STOPPING <worker_id> <t>           a signal (or stop()) began the shutdown
    STOPPED <worker_id> <t>            start() returned (clean stop)

Log records go to stderr as ``LOG <level> <logger>: <message>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

from psycopg.conninfo import make_conninfo

from chancy import Chancy, Queue, Worker
from chancy.plugins.leadership import Leadership
from chancy.plugins.recovery import Recovery

#: Job functions read this to find (and kill) the worker that runs them, even from a
#: process-executor child whose parent is the forkserver.
WORKER_PID_ENV = "CHANCY_ACCEPTANCE_WORKER_PID"

EXECUTORS = {
    "process": Chancy.Executor.Process,
    "threaded": Chancy.Executor.Threaded,
    "async": Chancy.Executor.Async,
}


def application_name(worker_id: str) -> str:
    """The ``application_name`` of every connection of worker ``worker_id``."""
    return f"acc:{worker_id}"[:63]


def parse_queue(spec: str) -> Queue:
    """``name[:executor[:concurrency[:polling_interval]]]``, e.g. ``q:threaded:4:0.2``."""
    name, *rest = spec.split(":")
    executor = EXECUTORS[rest[0]] if rest and rest[0] else Chancy.Executor.Process
    concurrency = int(rest[1]) if len(rest) > 1 and rest[1] else None
    polling = float(rest[2]) if len(rest) > 2 and rest[2] else 0.5
    return Queue(name, executor=executor, concurrency=concurrency, polling_interval=polling)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.worker_main")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--heartbeat-poll-interval", type=float, default=0.5)
    parser.add_argument("--heartbeat-timeout", type=float, default=2)
    parser.add_argument("--queue-change-poll-interval", type=float, default=0.5)
    parser.add_argument("--shutdown-timeout", type=float, default=10)
    parser.add_argument("--lease-poll-interval", type=float, default=0.5)
    parser.add_argument("--lease-timeout", type=float, default=2)
    parser.add_argument("--recovery-poll-interval", type=float, default=0.5)
    parser.add_argument("--declare", action="append", default=[], metavar="QUEUE_SPEC")
    parser.add_argument("--no-notifications", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def announce(*words: object) -> None:
    print(*words, f"{time.monotonic():.6f}", flush=True)


async def serve(args: argparse.Namespace) -> None:
    dsn = make_conninfo(
        os.environ["CHANCY_TEST_DSN_SCHEMA"], application_name=application_name(args.worker_id)
    )
    chancy = Chancy(
        dsn,
        notifications=not args.no_notifications,
        plugins=[
            Leadership(poll_interval=args.lease_poll_interval, timeout=args.lease_timeout),
            Recovery(poll_interval=args.recovery_poll_interval),
        ],
    )
    async with chancy:
        for spec in args.declare:
            await chancy.declare(parse_queue(spec), upsert=True)
        worker = Worker(
            chancy,
            worker_id=args.worker_id,
            heartbeat_poll_interval=args.heartbeat_poll_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            queue_change_poll_interval=args.queue_change_poll_interval,
            shutdown_timeout=args.shutdown_timeout,
        )
        hub = worker.hub

        def on_started(name: str, worker_id: Any) -> None:
            announce("READY", worker_id, os.getpid())

        def on_leadership(name: str, worker_id: Any) -> None:
            announce("LEADER", name.rpartition(".")[2], worker_id)

        def on_completed(name: str, outcome: Any) -> None:
            announce("COMPLETED", outcome.job.id, outcome.state)

        def on_recovered(name: str, event: Any) -> None:
            announce("RECOVERED", event["id"], event["state"])

        hub.on("worker.started", on_started)
        hub.on("leadership.gained", on_leadership)
        hub.on("leadership.lost", on_leadership)
        hub.on("job.completed", on_completed)
        hub.on("job.recovered", on_recovered)

        async def on_stopping() -> None:
            await worker.stopping.wait()
            announce("STOPPING", args.worker_id)

        watcher = asyncio.ensure_future(on_stopping())
        try:
            await worker.start()
        finally:
            watcher.cancel()
    announce("STOPPED", args.worker_id)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="LOG %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("psycopg").setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
