"""The rescue/complete race (issue 4, item 6), made deterministic with a test hook.

Recovery is one statement: it selects orphaned rows (locking them, skipping locked ones)
and updates them. A BEFORE UPDATE trigger installed by the test pauses whichever statement
runs on a connection named ``rel-paused`` until the test releases an advisory lock: so the
test can stop recovery between its selection and its update (or a completion between its
lock and its write) and let the other side run meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from chancy import Chancy, Job, Queue, QueuedJob
from chancy import store as store_module
from chancy.store import Outcome

PAUSE_KEY = 4_404_404
PAUSED_APP = "rel-paused"


@pytest.fixture
async def hooked(chancy: Chancy, dsn: str) -> AsyncIterator[Chancy]:
    """The app with the pause trigger on its jobs table and a live lease for "rescuer"."""
    await chancy.declare(Queue("q"))
    async with chancy.pool.connection() as conn:
        await conn.execute(
            """
            CREATE FUNCTION rel_pause() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF current_setting('application_name') = 'rel-paused' THEN
                    PERFORM pg_advisory_lock_shared(4404404);
                    PERFORM pg_advisory_unlock_shared(4404404);
                END IF;
                RETURN NEW;
            END $$
            """
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER rel_pause BEFORE UPDATE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION rel_pause()"
            ).format(sql.Identifier(chancy.prefix + "jobs"))
        )
    assert await chancy._run(chancy.store.acquire_lease("rescuer", 600))
    yield chancy


async def claim(chancy: Chancy, worker_id: str) -> QueuedJob:
    """A job claimed by ``worker_id``, as a worker's fetch leaves it."""
    await chancy._run(
        chancy.store.heartbeat(worker_id, hostname="h", pid=1, tags=[], queues=["q"], timeout=600)
    )
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q", max_attempts=3))
    (job,) = await chancy._run(chancy.store.fetch_jobs("q", worker_id, 1))
    assert job.id == ref and job.taken_by == worker_id
    return job


async def expire(chancy: Chancy, worker_id: str) -> None:
    async with chancy.pool.connection() as conn:
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET expires_at = now() - interval '1 second' WHERE worker_id = %s"
            ).format(sql.Identifier(chancy.prefix + "workers")),
            (worker_id,),
        )


async def wait_event(dsn: str, pid: int, events: set[str]) -> None:
    """Until backend ``pid`` waits on a lock of one of ``events``."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(400):
            cur = await conn.execute(
                "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            row = await cur.fetchone()
            if row is not None and row[0] == "Lock" and row[1] in events:
                return
            await asyncio.sleep(0.025)
    raise AssertionError(f"backend {pid} never waited on {events}")


async def row_of(chancy: Chancy, job: QueuedJob) -> dict[str, Any]:
    async with (
        chancy.pool.connection() as conn,
        conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
    ):
        await cur.execute(
            sql.SQL("SELECT * FROM {} WHERE id = %s").format(
                sql.Identifier(chancy.prefix + "jobs")
            ),
            (job.id.uuid,),
        )
        row = await cur.fetchone()
        assert row is not None
        return row


async def test_recovery_paused_between_select_and_update_while_the_job_completes(
    hooked: Chancy, dsn: str
) -> None:
    chancy = hooked
    job = await claim(chancy, "w1")
    await expire(chancy, "w1")  # w1 looks dead (a long GC pause, a partition...)
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as gate,
        await psycopg.AsyncConnection.connect(
            make_conninfo(dsn, application_name=PAUSED_APP), autocommit=True
        ) as paused,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as finisher,
    ):
        await gate.execute("SELECT pg_advisory_lock(%s)", (PAUSE_KEY,))
        rescue = asyncio.create_task(
            store_module.arun(paused, chancy.store.recover_orphaned_jobs("rescuer"))
        )
        await wait_event(dsn, paused.info.backend_pid, {"advisory"})
        # Recovery has selected (and locked) the job and is paused before its update.
        # Meanwhile w1 finishes the job and writes its outcome.
        complete = asyncio.create_task(
            store_module.arun(
                finisher,
                chancy.store.complete_jobs("w1", [Outcome(job, "succeeded", result="late")]),
            )
        )
        await wait_event(dsn, finisher.info.backend_pid, {"transactionid", "tuple"})
        assert not complete.done()
        await gate.execute("SELECT pg_advisory_unlock(%s)", (PAUSE_KEY,))
        recovered = await asyncio.wait_for(rescue, 10)
        written = await asyncio.wait_for(complete, 10)
    # Recovery won the row: the completion of the lost claim changed nothing.
    assert recovered == [(job.id, "retrying")]
    assert written == set()
    row = await row_of(chancy, job)
    assert (row["state"], row["attempts"], row["result"]) == ("retrying", 1, None)
    assert "WorkerDiedError" in row["errors"][0]["traceback"]
    # The retry runs elsewhere and completes; w1's outcome, written again, is still void.
    await chancy._run(
        chancy.store.heartbeat("w2", hostname="h", pid=2, tags=[], queues=["q"], timeout=600)
    )
    (retry,) = await chancy._run(chancy.store.fetch_jobs("q", "w2", 1))
    assert retry.attempts == 2
    assert await chancy._run(
        chancy.store.complete_jobs("w2", [Outcome(retry, "succeeded", result="retry")])
    ) == {job.id}
    assert (
        await chancy._run(
            chancy.store.complete_jobs("w1", [Outcome(job, "succeeded", result="late")])
        )
        == set()
    )
    row = await row_of(chancy, job)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 2, "retry")


async def test_completion_in_flight_while_recovery_runs_stays_completed(
    hooked: Chancy, dsn: str
) -> None:
    chancy = hooked
    job = await claim(chancy, "w1")
    await expire(chancy, "w1")
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as gate,
        await psycopg.AsyncConnection.connect(
            make_conninfo(dsn, application_name=PAUSED_APP), autocommit=True
        ) as paused,
    ):
        await gate.execute("SELECT pg_advisory_lock(%s)", (PAUSE_KEY,))
        complete = asyncio.create_task(
            store_module.arun(
                paused,
                chancy.store.complete_jobs("w1", [Outcome(job, "succeeded", result="done")]),
            )
        )
        # The completion holds the row and is paused before its write.
        await wait_event(dsn, paused.info.backend_pid, {"advisory"})
        recovered = await asyncio.wait_for(
            chancy._run(chancy.store.recover_orphaned_jobs("rescuer")), 5
        )
        assert recovered == []  # the row being completed is skipped, not waited for
        await gate.execute("SELECT pg_advisory_unlock(%s)", (PAUSE_KEY,))
        assert await asyncio.wait_for(complete, 10) == {job.id}
    # Completed, and it stays completed through later recovery passes.
    for _ in range(2):
        assert await chancy._run(chancy.store.recover_orphaned_jobs("rescuer")) == []
    row = await row_of(chancy, job)
    assert (row["state"], row["attempts"], row["result"], row["errors"]) == (
        "succeeded",
        1,
        "done",
        [],
    )
