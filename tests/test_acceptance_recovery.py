"""Acceptance: dead, poisoned and frozen workers (DESIGN §3.2 at-least-once, §3.3 claim
guard, §3.4 attempts counted at claim, §3.8 one leader).

Workers run with heartbeat 0.5 s / timeout 2 s, lease 0.5 s / 2 s and Recovery every
0.5 s unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from chancy import Chancy, Job, Queue, Reference
from tests.proc import (
    HEARTBEAT_TIMEOUT,
    LEASE_TIMEOUT,
    POLL_INTERVAL,
    WorkerProcess,
    Workers,
    eventually,
    job_rows,
    journal,
    journal_lines,
    lease,
    query,
    worker_processes,
    worker_row,
)

#: A dead worker's jobs must be back in line within its heartbeat timeout (or the lease
#: timeout, if it was the leader) plus one Recovery interval; the rest is scheduling slack.
RECOVERY_BOUND = max(HEARTBEAT_TIMEOUT, LEASE_TIMEOUT) + 2 * POLL_INTERVAL + 1.5


@pytest.fixture
def workers(python: str, subprocess_env: dict[str, str]) -> Iterator[Workers]:
    with worker_processes(python, subprocess_env) as started:
        yield started


def slow_first(path: Path, tag: str, first: float, *, queue: str = "acc", **fields: Any) -> Job:
    return Job(
        func="tests.acceptance_jobs.slow_first_attempt",
        queue=queue,
        kwargs={"path": str(path), "tag": tag, "first": first, "later": 0.1},
        **fields,
    )


async def wait_states(
    chancy: Chancy, refs: list[Reference], states: set[str], *, timeout: float, what: str
) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]]:
        rows = await job_rows(chancy, refs)
        return rows if len(rows) == len(refs) and all(r["state"] in states for r in rows) else []

    return await eventually(probe, timeout=timeout, what=what)


async def test_kill_9_worker_jobs_are_recovered_and_completed(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=3, polling_interval=0.2)
    )
    doomed = await workers.start()
    path = tmp_path / "journal"
    refs = [await chancy.push(slow_first(path, f"j{i}", 30, max_attempts=3)) for i in range(3)]
    await journal_lines(path, 3, "start", timeout=15)
    survivor = await workers.start()
    rows = await job_rows(chancy, refs)
    assert {(r["state"], r["taken_by"]) for r in rows} == {("running", doomed.worker_id)}

    killed = time.monotonic()
    doomed.send(signal.SIGKILL)

    async def recovered_all() -> list[dict[str, Any]]:
        rows = await job_rows(chancy, refs)
        return rows if all(r["attempts"] == 2 or r["state"] == "retrying" for r in rows) else []

    await eventually(recovered_all, timeout=RECOVERY_BOUND, what="recovery", interval=0.02)
    recovered = time.monotonic() - killed
    rows = await wait_states(chancy, refs, {"succeeded"}, timeout=10, what="completion")
    completed = time.monotonic() - killed
    print(f"kill -9: recovered in {recovered:.2f} s, all succeeded {completed:.2f} s after kill")

    for row in rows:
        assert (row["attempts"], row["taken_by"]) == (2, survivor.worker_id)
        assert row["result"] == 2
        (error,) = row["errors"]
        assert error["attempt"] == 1
        assert "WorkerDiedError" in error["traceback"]
        assert doomed.worker_id in error["traceback"]
    assert survivor.alive


def session_processes(session: int) -> list[int]:
    """Live (non-zombie) processes of a session, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


async def test_kill_9_worker_leaves_no_job_process_running(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=2, polling_interval=0.2)
    )
    doomed = await workers.start()
    path = tmp_path / "journal"
    for i in range(2):
        await chancy.push(slow_first(path, f"j{i}", 30, max_attempts=3))
    await journal_lines(path, 2, "start", timeout=15)
    assert len(session_processes(doomed.pid)) >= 3  # worker, forkserver, two children

    doomed.send(signal.SIGKILL)
    assert await doomed.exit_code(5) == -signal.SIGKILL

    async def gone() -> bool:
        return not await asyncio.to_thread(session_processes, doomed.pid)

    await eventually(gone, timeout=3, what=f"{session_processes(doomed.pid)} to exit")


async def test_poison_job_that_kills_its_child_fails_after_max_attempts(
    chancy: Chancy, workers: Workers
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=4, polling_interval=0.2)
    )
    worker = await workers.start()
    poison = await chancy.push(Job(func="tests.jobs.die", queue="acc", max_attempts=2))
    normal = [
        await chancy.push(
            Job(func="tests.jobs.sleep", queue="acc", kwargs={"seconds": 0.05 * (i % 4)})
        )
        for i in range(20)
    ]
    rows = await wait_states(
        chancy, [poison, *normal], {"succeeded", "failed"}, timeout=30, what="all jobs"
    )
    poisoned, *others = rows
    assert (poisoned["state"], poisoned["attempts"]) == ("failed", 2)
    assert [e["attempt"] for e in poisoned["errors"]] == [1, 2]
    assert all("WorkerDiedError" in e["traceback"] for e in poisoned["errors"])
    assert [(r["state"], r["attempts"], r["errors"]) for r in others] == [("succeeded", 1, [])] * 20
    assert worker.alive
    assert (await worker_row(chancy, worker.worker_id) or {}).get("alive")


async def test_job_that_kills_its_whole_worker_fails_after_max_attempts(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    """Each attempt kill -9s the worker process itself; replacements keep two workers up.
    Attempts are counted at claim, so the second death fails the job instead of looping."""
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=2, polling_interval=0.2)
    )
    alive: list[WorkerProcess] = [await workers.start(), await workers.start()]
    path = tmp_path / "journal"
    ref = await chancy.push(
        Job(
            func="tests.acceptance_jobs.kill_worker",
            queue="acc",
            kwargs={"path": str(path)},
            max_attempts=2,
        )
    )
    deaths: list[WorkerProcess] = []

    async def settled() -> dict[str, Any] | None:
        for process in list(alive):
            if not process.alive:
                alive.remove(process)
                deaths.append(process)
                alive.append(workers.spawn())
        (row,) = await job_rows(chancy, [ref])
        return row if row["state"] == "failed" else None

    row = await eventually(settled, timeout=40, what="the job to fail", interval=0.1)
    assert row["attempts"] == 2
    assert [e["attempt"] for e in row["errors"]] == [1, 2]
    assert all("WorkerDiedError" in e["traceback"] for e in row["errors"])
    assert len(deaths) == 2
    assert len([line for line in journal(path) if line.startswith("kill")]) == 2
    for process in deaths:
        assert process.popen.returncode == -signal.SIGKILL
    # Not looping: the surviving workers are healthy and the job stays failed.
    for process in alive:
        await process.line(r"^READY ", 20)
    (row,) = await job_rows(chancy, [ref])
    assert (row["state"], row["attempts"]) == ("failed", 2)
    assert all(process.alive for process in alive)


async def test_frozen_worker_late_completion_changes_nothing(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=2, polling_interval=0.2)
    )
    zombie = await workers.start()
    await eventually(
        lambda: lease(chancy), timeout=5, what="the first worker to lead", interval=0.05
    )
    path = tmp_path / "journal"
    # Attempt 1 (on the zombie's child, which keeps running while its worker is frozen)
    # ends 3 s after it starts; the recovered attempt 2 takes 0.1 s.
    (ref,) = [await chancy.push(slow_first(path, "j0", 3, max_attempts=3))]
    await journal_lines(path, 1, "start j0 1", timeout=15)
    healthy = await workers.start()

    zombie.send(signal.SIGSTOP)
    frozen = time.monotonic()
    (final,) = await wait_states(chancy, [ref], {"succeeded"}, timeout=15, what="recovery")
    print(f"SIGSTOP: job recovered and completed {time.monotonic() - frozen:.2f} s later")
    assert (final["attempts"], final["taken_by"], final["result"]) == (2, healthy.worker_id, 2)
    held = await lease(chancy)
    assert held is not None and held["worker_id"] == healthy.worker_id
    # The zombie's child finishes attempt 1 meanwhile; its reply waits in the pipe.
    await journal_lines(path, 1, "end j0 1", timeout=10)

    mark = zombie.mark()
    zombie.send(signal.SIGCONT)
    await zombie.line(rf"^COMPLETED {ref} succeeded", 10, since=mark)
    await zombie.line(r"^LEADER lost", 10, since=mark)
    # Two fresh heartbeats of the zombie prove its event loop ran past the late outcome,
    # whose batch is written within milliseconds.
    seen = (await worker_row(chancy, zombie.worker_id) or {})["last_seen"]
    for _ in range(2):

        async def heartbeat(after: Any = seen) -> Any:
            row = await worker_row(chancy, zombie.worker_id)
            return row["last_seen"] if row and row["last_seen"] > after else None

        seen = await eventually(heartbeat, timeout=5, what="a zombie heartbeat")

    (after,) = await job_rows(chancy, [ref])
    assert after == final
    held = await lease(chancy)
    assert held is not None and held["worker_id"] == healthy.worker_id
    assert not zombie.find(r"^LEADER gained", since=mark)
    assert not zombie.find(r"^RECOVERED ", since=mark)
    assert zombie.alive and healthy.alive


async def test_frozen_ex_leader_does_not_act_before_checking_its_lease(
    chancy: Chancy, workers: Workers
) -> None:
    """After a freeze, a worker that led must not act as leader until it holds the lease
    again. Its Recovery (every 1 s) is frozen mid-sleep with a deadline before that of
    Leadership (every 1.5 s), so the overdue timers fire Recovery first on SIGCONT. The
    real leader is frozen too, holding a valid lease, so only the ex-leader could touch
    the orphan."""
    ex_leader = await workers.start(
        lease_poll_interval=1.5, lease_timeout=2, recovery_poll_interval=1.0
    )
    await ex_leader.line(r"^LEADER gained", 5)
    gained = (await lease(chancy) or {})["acquired_at"]

    async def settled() -> bool:
        # A heartbeat 0.2-0.7 s after gaining: Recovery's first pass is over, and both
        # Recovery (due ~1 s after gaining) and Leadership (due 1.5 s after) are asleep.
        row = await worker_row(chancy, ex_leader.worker_id)
        return bool(row and row["last_seen"] > gained + dt.timedelta(seconds=0.2))

    await eventually(settled, timeout=5, what="an ex-leader heartbeat", interval=0.01)
    ex_leader.send(signal.SIGSTOP)
    leader = await workers.start()

    async def leads() -> bool:
        held = await lease(chancy)
        return bool(held and held["worker_id"] == leader.worker_id and held["valid"])

    await eventually(leads, timeout=10, what="the second worker to take the lease")
    # Freeze the leader right after a renewal: its lease stays valid for ~2 s more.
    renewed = (await lease(chancy) or {})["expires_at"]

    async def renewed_again() -> bool:
        held = await lease(chancy)
        return bool(held and held["expires_at"] > renewed)

    await eventually(renewed_again, timeout=5, what="a lease renewal", interval=0.01)
    leader.send(signal.SIGSTOP)
    ghost = uuid.uuid4()
    await query(
        chancy,
        "INSERT INTO {jobs} (id, queue, func, state, attempts, taken_by, started_at) "
        "VALUES (%(id)s, 'acc', 'tests.jobs.noop', 'running', 1, 'ghost', now())",
        {"id": ghost},
    )
    (now,) = await query(chancy, "SELECT now() AS t")
    mark = ex_leader.mark()
    ex_leader.send(signal.SIGCONT)
    await ex_leader.line(r"^LEADER lost", 5, since=mark)

    async def heartbeat() -> bool:
        # The second heartbeat after SIGCONT: every overdue timer has fired by then.
        row = await worker_row(chancy, ex_leader.worker_id)
        return bool(row and row["last_seen"] > now["t"] + dt.timedelta(seconds=0.3))

    await eventually(heartbeat, timeout=5, what="a second ex-leader heartbeat")
    held = await lease(chancy)
    assert held is not None and held["worker_id"] == leader.worker_id
    (row,) = await job_rows(chancy, [ghost])
    assert (row["state"], row["taken_by"]) == ("running", "ghost"), ex_leader.output()
    assert not ex_leader.find(r"^RECOVERED ", since=mark)
    leader.send(signal.SIGCONT)


async def test_leader_never_recovers_its_own_running_jobs(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    """A heartbeat held back (here by a row lock; in life by a slow or dropped
    connection) lets the worker's row expire while it runs a job. Other workers may then
    take the job, by design; the worker itself knows better and must not."""
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Threaded, concurrency=1, polling_interval=0.2)
    )
    worker = await workers.start()
    path = tmp_path / "journal"
    ref = await chancy.push(slow_first(path, "j0", 5, max_attempts=3))
    await journal_lines(path, 1, "start", timeout=15)
    await eventually(lambda: lease(chancy), timeout=5, what="the worker to lead")

    async with chancy.pool.connection() as conn, conn.transaction():
        await conn.execute(
            sql.SQL("SELECT 1 FROM {} WHERE worker_id = %s FOR UPDATE").format(
                sql.Identifier(chancy.prefix + "workers")
            ),
            (worker.worker_id,),
        )

        async def expired_a_while() -> bool:
            # Expired for two Recovery intervals and more: a leader that recovers
            # its own jobs has done so by now.
            rows = await query(
                chancy,
                "SELECT expires_at < now() - make_interval(secs => %(s)s) AS long_ago "
                "FROM {workers} WHERE worker_id = %(w)s",
                {"s": 2 * POLL_INTERVAL + 0.2, "w": worker.worker_id},
            )
            return bool(rows and rows[0]["long_ago"])

        await eventually(expired_a_while, timeout=10, what="the heartbeat to expire")

    (row,) = await wait_states(chancy, [ref], {"succeeded", "failed"}, timeout=10, what="end")
    assert (row["state"], row["attempts"], row["errors"]) == ("succeeded", 1, []), row
    assert [line for line in journal(path) if line.startswith("start")] == ["start j0 1"]
    assert not worker.find(r"^RECOVERED ")
