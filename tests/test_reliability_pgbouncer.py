"""Chancy behind PgBouncer in transaction pooling mode (issue 4, item 10).

Settings: ``Chancy(dsn, notifications=False, prepare_threshold=None)``: no LISTEN (a
pooled server connection cannot keep one) and no server-side prepared statements (a
statement prepared on one server connection is unknown on the next; PgBouncer 1.18 does
not track them). Workers find jobs by polling. Push, work, migrations and recovery of a
kill -9'd worker all go through PgBouncer here.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from chancy import Chancy, Job, Queue, Worker
from tests.pgbouncer import pgbouncer
from tests.proc import eventually, job_rows, journal_lines
from tests.rel_proc import RelWorkers


@pytest.fixture
def bouncer_dsn(dsn: str) -> Iterator[str]:
    options = conninfo_to_dict(dsn).get("options") or ""
    match = re.search(r"search_path=(\w+)", str(options))
    assert match is not None
    with pgbouncer(dsn, match.group(1)) as client_dsn:
        yield client_dsn


def through(dsn: str) -> Chancy:
    return Chancy(dsn, notifications=False, prepare_threshold=None)


async def test_push_work_and_migrate_through_pgbouncer(bouncer_dsn: str) -> None:
    app = through(bouncer_dsn)
    async with app:
        await app.migrate()
        assert await app.is_up_to_date()
        await app.declare(
            Queue("q", executor=Chancy.Executor.Async, concurrency=4, polling_interval=0.2)
        )
        refs = [
            await app.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": i, "b": 1}))
            for i in range(20)
        ]
        refs += [
            r
            async for batch in app.push_many(
                [
                    Job(func="tests.jobs.add", queue="q", kwargs={"a": 100, "b": i})
                    for i in range(50)
                ]
            )
            for r in batch
        ]
        async with Worker(
            app, register_signal_handlers=False, heartbeat_poll_interval=0.5, heartbeat_timeout=2
        ) as worker:
            done = await app.wait_for_jobs(refs, interval=0.1, timeout=30)
            later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
            future = await app.push(Job(func="tests.jobs.noop", queue="q", scheduled_at=later))
            assert await app.cancel_job(future)
            assert not worker.stopping.is_set()
        assert sorted(j.result for j in done) == sorted(
            [i + 1 for i in range(20)] + [100 + i for i in range(50)]
        )
        assert {(j.state, j.attempts) for j in done} == {("succeeded", 1)}
    with app:
        ref = app.sync_push(Job(func="tests.jobs.noop", queue="q"))
        stored = app.sync_get_job(ref)
        assert stored is not None and stored.state == "pending"


async def test_recovery_through_pgbouncer(
    bouncer_dsn: str, python: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    app = through(bouncer_dsn)
    env = {**subprocess_env, "BOUNCER_DSN": bouncer_dsn}
    workers = RelWorkers(python, env)
    flags = ("--no-notifications",)
    settings: dict[str, Any] = {"dsn_env": "BOUNCER_DSN", "prepare_threshold": "none"}
    try:
        async with app:
            await app.migrate()
            await app.declare(
                Queue("q", executor=Chancy.Executor.Async, concurrency=5, polling_interval=0.2)
            )
            doomed = await workers.start(None, *flags, **settings)
            path = tmp_path / "journal"
            refs = [
                await app.push(
                    Job(
                        func="tests.rel_jobs.async_slow_first",
                        queue="q",
                        kwargs={"path": str(path), "tag": f"j{i}", "first": 60, "later": 0.05},
                        max_attempts=3,
                    )
                )
                for i in range(5)
            ]
            await journal_lines(path, 5, "start", timeout=15)
            survivor = await workers.start(None, *flags, **settings)
            killed = time.monotonic()
            doomed.send(signal.SIGKILL)

            async def succeeded() -> bool:
                rows = await job_rows(app, refs)
                return len(rows) == 5 and all(r["state"] == "succeeded" for r in rows)

            await eventually(succeeded, timeout=20, what="recovery through pgbouncer")
            print(f"pgbouncer: recovered and done {time.monotonic() - killed:.2f} s after kill -9")
            for row in await job_rows(app, refs):
                assert (row["attempts"], row["taken_by"]) == (2, survivor.worker_id)
                assert "WorkerDiedError" in row["errors"][0]["traceback"]
            assert survivor.alive
            assert "prepared statement" not in survivor.output()
    finally:
        workers.close()
