"""A worker process for the reliability suite: ``tests.worker_main`` plus the knobs the
fault tests need (prepared statements, pruning, a DSN from another variable, extra tags).

``python -m tests.rel_worker --worker-id w1 [options]`` prints the same event lines as
``tests.worker_main`` (READY, LEADER, COMPLETED, RECOVERED, STOPPING, STOPPED).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from psycopg.conninfo import make_conninfo

from chancy import Chancy, Worker
from chancy.plugins.leadership import Leadership
from chancy.plugins.pruner import Pruner
from chancy.plugins.recovery import Recovery
from chancy.worker import exit_if_threads_linger
from tests.worker_main import WORKER_PID_ENV, announce, application_name, parse_queue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.rel_worker")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--dsn-env", default="CHANCY_TEST_DSN_SCHEMA")
    parser.add_argument("--heartbeat-poll-interval", type=float, default=0.5)
    parser.add_argument("--heartbeat-timeout", type=float, default=2)
    parser.add_argument("--queue-change-poll-interval", type=float, default=0.5)
    parser.add_argument("--shutdown-timeout", type=float, default=10)
    parser.add_argument("--lease-poll-interval", type=float, default=0.5)
    parser.add_argument("--lease-timeout", type=float, default=2)
    parser.add_argument("--recovery-poll-interval", type=float, default=0.5)
    parser.add_argument("--prune-age", type=float, default=None)
    parser.add_argument("--prune-interval", type=float, default=1.0)
    parser.add_argument("--prepare-threshold", default="5")
    parser.add_argument("--declare", action="append", default=[], metavar="QUEUE_SPEC")
    parser.add_argument("--queue", action="append", default=None)
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("--no-notifications", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    dsn = make_conninfo(os.environ[args.dsn_env], application_name=application_name(args.worker_id))
    plugins: list[Any] = [
        Leadership(poll_interval=args.lease_poll_interval, timeout=args.lease_timeout),
        Recovery(poll_interval=args.recovery_poll_interval),
    ]
    if args.prune_age is not None:
        plugins.append(
            Pruner(Pruner.Rules.Age() > args.prune_age, poll_interval=args.prune_interval)
        )
    threshold = None if args.prepare_threshold.lower() == "none" else int(args.prepare_threshold)
    chancy = Chancy(
        dsn,
        notifications=not args.no_notifications,
        plugins=plugins,
        prepare_threshold=threshold,
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
            tags=args.tag,
            queues=args.queue,
        )
        hub = worker.hub
        hub.on("worker.started", lambda name, wid: announce("READY", wid, os.getpid()))
        for event in ("leadership.gained", "leadership.lost"):
            hub.on(event, lambda name, wid: announce("LEADER", name.rpartition(".")[2], wid))
        hub.on("job.completed", lambda name, o: announce("COMPLETED", o.job.id, o.state))
        hub.on("job.recovered", lambda name, e: announce("RECOVERED", e["id"], e["state"]))

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
    # As the CLI does: threads a job left behind cannot hold the process past this.
    exit_if_threads_linger()


if __name__ == "__main__":
    main()
