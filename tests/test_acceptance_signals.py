"""Acceptance: real worker processes and real signals (DESIGN §3.6 graceful shutdown).

Every worker here is ``tests.worker_main`` with heartbeat 0.5 s / timeout 2 s and lease
0.5 s / 2 s, so a dead worker's jobs are recovered within a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from chancy import Chancy, Job, Queue, Reference
from tests.proc import (
    HEARTBEAT_TIMEOUT,
    Workers,
    eventually,
    job_rows,
    journal,
    journal_lines,
    worker_processes,
    worker_row,
)

EXECUTORS = [
    pytest.param(Chancy.Executor.Process, id="process"),
    pytest.param(Chancy.Executor.Threaded, id="threaded"),
    pytest.param(Chancy.Executor.Async, id="async"),
]


@pytest.fixture
def workers(python: str, subprocess_env: dict[str, str]) -> Iterator[Workers]:
    with worker_processes(python, subprocess_env) as started:
        yield started


async def push_journaled(
    chancy: Chancy, queue: str, path: Path, durations: list[float], **fields: object
) -> list[Reference]:
    refs = []
    for index, seconds in enumerate(durations):
        job = Job(
            func="tests.acceptance_jobs.journal_sleep",
            queue=queue,
            kwargs={"path": str(path), "tag": f"j{index}", "seconds": seconds},
            **fields,  # type: ignore[arg-type]
        )
        refs.append(await chancy.push(job))
    return refs


async def push_slow_first(
    chancy: Chancy, queue: str, path: Path, count: int, first: float, max_attempts: int = 3
) -> list[Reference]:
    refs = []
    for index in range(count):
        job = Job(
            func="tests.acceptance_jobs.slow_first_attempt",
            queue=queue,
            kwargs={"path": str(path), "tag": f"j{index}", "first": first, "later": 0.1},
            max_attempts=max_attempts,
        )
        refs.append(await chancy.push(job))
    return refs


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_sigterm_lets_running_jobs_finish_exactly_once(
    chancy: Chancy, workers: Workers, tmp_path: Path, executor: str
) -> None:
    shutdown_timeout = 10
    await chancy.declare(Queue("acc", executor=executor, concurrency=4, polling_interval=0.2))
    worker = await workers.start(shutdown_timeout=shutdown_timeout)
    path = tmp_path / "journal"
    refs = await push_journaled(chancy, "acc", path, [1.5, 1.7, 1.9, 2.0])
    await journal_lines(path, 4, "start", timeout=15)
    # Two more jobs wait for a slot: after SIGTERM the worker must not fetch them.
    waiting = await push_journaled(chancy, "acc", tmp_path / "late", [0.1, 0.1])

    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    code = await worker.exit_code(shutdown_timeout + 2)
    elapsed = time.monotonic() - sent
    print(f"[{executor.rsplit('.', 1)[1]}] SIGTERM -> exit {code} in {elapsed:.2f} s")

    assert code == 0, worker.output()
    rows = await job_rows(chancy, refs)
    assert [(r["state"], r["attempts"], r["errors"]) for r in rows] == [("succeeded", 1, [])] * 4
    counts = Counter(journal(path))
    assert counts == {f"{edge} j{i}": 1 for i in range(4) for edge in ("start", "end")}
    assert [(r["state"], r["attempts"]) for r in await job_rows(chancy, waiting)] == [
        ("pending", 0)
    ] * 2
    assert journal(tmp_path / "late") == []
    assert await worker_row(chancy, worker.worker_id) is None
    assert worker.find(r"^STOPPED ")


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_sigterm_hands_back_jobs_longer_than_shutdown_timeout(
    chancy: Chancy, workers: Workers, tmp_path: Path, executor: str
) -> None:
    shutdown_timeout = 1
    await chancy.declare(Queue("acc", executor=executor, concurrency=2, polling_interval=0.2))
    worker = await workers.start(shutdown_timeout=shutdown_timeout)
    path = tmp_path / "journal"
    refs = await push_journaled(chancy, "acc", path, [30, 30], max_attempts=3)
    await journal_lines(path, 2, "start", timeout=15)

    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    code = await worker.exit_code(shutdown_timeout + 3)
    elapsed = time.monotonic() - sent
    print(f"[{executor.rsplit('.', 1)[1]}] SIGTERM (30 s jobs) -> exit {code} in {elapsed:.2f} s")

    assert code == 0, worker.output()
    rows = await job_rows(chancy, refs)
    # Handed back for another worker; the interrupted attempt is not counted.
    assert {r["state"] for r in rows} <= {"pending", "retrying"}, rows
    assert [r["attempts"] for r in rows] == [0, 0]
    assert [r["completed_at"] for r in rows] == [None, None]
    assert not [line for line in journal(path) if line.startswith("end")]
    assert await worker_row(chancy, worker.worker_id) is None


async def test_sigterm_kills_a_job_that_ignores_the_interrupt_after_kill_grace(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    shutdown_timeout, kill_grace = 1, 1
    await chancy.declare(
        Queue(
            "acc",
            executor=Chancy.Executor.Process,
            concurrency=1,
            polling_interval=0.2,
            executor_options={"kill_grace": kill_grace},
        )
    )
    worker = await workers.start(shutdown_timeout=shutdown_timeout)
    path = tmp_path / "journal"
    (ref,) = [
        await chancy.push(
            Job(
                func="tests.acceptance_jobs.stubborn_sleep",
                queue="acc",
                kwargs={"path": str(path), "tag": "j0", "seconds": 30},
                max_attempts=2,
            )
        )
    ]
    await journal_lines(path, 1, "start", timeout=15)

    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    code = await worker.exit_code(shutdown_timeout + kill_grace + 3)
    print(f"SIGTERM (job ignoring the interrupt) -> exit {code} in {time.monotonic() - sent:.2f} s")

    assert code == 0, worker.output()
    assert "ignored j0" in journal(path)  # it was asked to stop, and refused
    (row,) = await job_rows(chancy, [ref])
    assert (row["state"], row["attempts"], row["completed_at"]) == ("pending", 0, None), row


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_second_signal_exits_at_once_and_leaves_jobs_to_recovery(
    chancy: Chancy, workers: Workers, tmp_path: Path, executor: str
) -> None:
    await chancy.declare(Queue("acc", executor=executor, concurrency=2, polling_interval=0.2))
    first = await workers.start(shutdown_timeout=30)
    path = tmp_path / "journal"
    refs = await push_slow_first(chancy, "acc", path, 2, first=30)
    await journal_lines(path, 2, "start", timeout=15)

    mark = first.mark()
    first.send(signal.SIGTERM)
    await first.line(r"stopping gracefully", 5, since=mark)
    sent = time.monotonic()
    first.send(signal.SIGINT)
    code = await first.exit_code(1.0)
    elapsed = time.monotonic() - sent
    print(f"[{executor.rsplit('.', 1)[1]}] SIGTERM+SIGINT -> exit {code} in {elapsed:.2f} s")

    # Nothing recorded: the jobs are still running on the dead worker's claim.
    rows = await job_rows(chancy, refs)
    assert [(r["state"], r["attempts"], r["taken_by"], r["errors"]) for r in rows] == [
        ("running", 1, first.worker_id, [])
    ] * 2

    second = await workers.start()
    started = time.monotonic()

    async def finished() -> list[dict[str, object]]:
        rows = await job_rows(chancy, refs)
        return rows if all(r["state"] == "succeeded" for r in rows) else []

    rows = await eventually(finished, timeout=HEARTBEAT_TIMEOUT + 8, what="recovered jobs")
    print(f"recovered and completed {time.monotonic() - started:.2f} s after the second worker")
    for row in rows:
        assert row["attempts"] == 2
        assert row["taken_by"] == second.worker_id
        assert [e["attempt"] for e in row["errors"]] == [1]
        assert "WorkerDiedError" in row["errors"][0]["traceback"]


async def test_worker_keeps_heartbeating_while_it_finishes_jobs_on_shutdown(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Threaded, concurrency=2, polling_interval=0.2)
    )
    stopping = await workers.start(shutdown_timeout=15)
    path = tmp_path / "journal"
    # Longer than heartbeat_timeout (2 s), well within shutdown_timeout (15 s).
    refs = await push_journaled(chancy, "acc", path, [HEARTBEAT_TIMEOUT + 3], max_attempts=3)
    await journal_lines(path, 1, "start", timeout=15)
    healthy = await workers.start()  # its Recovery would take orphaned jobs

    stopping.send(signal.SIGTERM)
    code = await stopping.exit_code(15 + 2)
    assert code == 0, stopping.output()

    async def done() -> list[dict[str, object]]:
        rows = await job_rows(chancy, refs)
        return rows if rows[0]["state"] in ("succeeded", "failed") else []

    (row,) = await eventually(done, timeout=10, what="the job to finish")
    outputs = f"{row}\n{stopping.output()}\n---\n{healthy.output()}"
    assert Counter(journal(path)) == {"start j0": 1, "end j0": 1}, outputs
    assert (row["state"], row["attempts"], row["taken_by"], row["errors"]) == (
        "succeeded",
        1,
        stopping.worker_id,
        [],
    )


async def test_sigterm_to_the_process_group_still_lets_jobs_finish(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Process, concurrency=2, polling_interval=0.2)
    )
    worker = await workers.start(shutdown_timeout=10)
    path = tmp_path / "journal"
    refs = await push_journaled(chancy, "acc", path, [1.5, 1.5])
    await journal_lines(path, 2, "start", timeout=15)

    os.killpg(worker.pid, signal.SIGTERM)  # as systemd stops a service
    code = await worker.exit_code(10 + 2)

    assert code == 0, worker.output()
    rows = await job_rows(chancy, refs)
    assert [(r["state"], r["attempts"]) for r in rows] == [("succeeded", 1)] * 2, rows


async def test_sigterm_waits_for_a_completion_that_is_slow_to_write(
    chancy: Chancy, workers: Workers, tmp_path: Path
) -> None:
    """The last outcome before a clean stop must be written, however slow the database.
    A row lock taken by the test holds the worker's completion UPDATE in flight."""
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Threaded, concurrency=1, polling_interval=0.2)
    )
    worker = await workers.start(shutdown_timeout=10)
    path = tmp_path / "journal"
    (ref,) = await push_journaled(chancy, "acc", path, [1.0])
    await journal_lines(path, 1, "start", timeout=15)

    async with chancy.pool.connection() as conn, conn.transaction():
        await conn.execute(
            sql.SQL("SELECT id FROM {} WHERE id = %s FOR UPDATE").format(
                sql.Identifier(chancy.prefix + "jobs")
            ),
            (ref.uuid,),
        )
        mark = worker.mark()
        worker.send(signal.SIGTERM)
        await worker.line(rf"^COMPLETED {ref} succeeded", 10, since=mark)
        # Hold the write back for up to 2 s: a correct worker waits for it; the lock
        # is then released and the write goes through.
        with contextlib.suppress(AssertionError):
            await worker.exit_code(2)
    code = await worker.exit_code(10)

    assert code == 0, worker.output()
    (row,) = await job_rows(chancy, [ref])
    assert (row["state"], row["attempts"], row["taken_by"]) == (
        "succeeded",
        1,
        worker.worker_id,
    ), worker.output()
