"""Acceptance: lost connections, polling without LISTEN, and leadership across real
worker processes (DESIGN §3.7 self-healing worker, §3.8 one leader at most)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chancy import Chancy, Job, Queue, Reference
from tests.proc import (
    LEASE_TIMEOUT,
    POLL_INTERVAL,
    Workers,
    backends,
    eventually,
    job_rows,
    lease,
    query,
    worker_processes,
    worker_row,
)


@pytest.fixture
def workers(python: str, subprocess_env: dict[str, str]) -> Iterator[Workers]:
    with worker_processes(python, subprocess_env) as started:
        yield started


async def push_adds(chancy: Chancy, queue: str, count: int, start: int = 0) -> list[Reference]:
    return [
        await chancy.push(Job(func="tests.jobs.add", queue=queue, kwargs={"a": i, "b": 1}))
        for i in range(start, start + count)
    ]


async def all_succeeded(
    chancy: Chancy, refs: list[Reference], *, timeout: float, what: str
) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]]:
        rows = await job_rows(chancy, refs)
        done = len(rows) == len(refs) and all(r["state"] == "succeeded" for r in rows)
        return rows if done else []

    return await eventually(probe, timeout=timeout, what=what)


async def listening(chancy: Chancy, worker_id: str, since: Any = None) -> bool:
    """True once the worker has a LISTEN connection (opened after ``since``)."""
    return any(
        row["query"].startswith("LISTEN")
        and row["state"] == "idle"
        and (since is None or row["backend_start"] > since)
        for row in await backends(chancy, worker_id)
    )


async def test_worker_survives_terminated_backends_and_loses_no_job(
    chancy: Chancy, workers: Workers
) -> None:
    # A long polling interval: once the worker has healed, a job done well within it was
    # woken by NOTIFY on the re-established LISTEN connection.
    polling_interval = 5.0
    await chancy.declare(
        Queue(
            "acc",
            executor=Chancy.Executor.Threaded,
            concurrency=4,
            polling_interval=polling_interval,
        )
    )
    worker = await workers.start()
    await eventually(lambda: listening(chancy, worker.worker_id), timeout=5, what="LISTEN")
    refs: list[Reference] = []
    for round_ in range(3):
        # Jobs in flight while every connection of the worker is cut.
        refs += [
            await chancy.push(
                Job(func="tests.jobs.sleep", queue="acc", kwargs={"seconds": 0.05 * (i % 3)})
            )
            for i in range(8)
        ]
        (cut,) = await query(chancy, "SELECT now() AS t")
        pids = [row["pid"] for row in await backends(chancy, worker.worker_id)]
        assert len(pids) >= 2, "expected pooled connections and the LISTEN connection"
        await query(
            chancy, "SELECT pg_terminate_backend(pid) FROM unnest(%(p)s::int[]) AS pid", {"p": pids}
        )
        # Pushed while the worker reconnects: found on re-LISTEN or by polling.
        pushed = time.monotonic()
        late = await push_adds(chancy, "acc", 3, start=10 * round_)
        await eventually(
            functools.partial(listening, chancy, worker.worker_id, cut["t"]),
            timeout=10,
            what=f"LISTEN again after cut {round_ + 1}",
        )
        # Loops that draw a dead pooled connection fail, back off (up to 5 s) and retry.
        try:
            await all_succeeded(chancy, late, timeout=polling_interval + 6, what="jobs after a cut")
        except AssertionError as exc:
            states = [(r["state"], r["attempts"]) for r in await job_rows(chancy, refs + late)]
            raise AssertionError(f"{exc}\njobs: {states}\n{worker.output()}") from None
        print(
            f"cut {round_ + 1}: {len(pids)} backends killed; "
            f"jobs pushed meanwhile done in {time.monotonic() - pushed:.2f} s"
        )
        refs += late
        assert worker.alive, worker.output()

    # Healed: two heartbeats later every loop has drawn (and dropped) its dead connections.
    for _ in range(2):
        before = (await worker_row(chancy, worker.worker_id) or {})["last_seen"]

        async def heartbeat(after: Any = before) -> bool:
            row = await worker_row(chancy, worker.worker_id)
            return bool(row and row["last_seen"] > after)

        await eventually(heartbeat, timeout=10, what="a heartbeat")
    pushed = time.monotonic()
    hinted = await push_adds(chancy, "acc", 1, start=100)
    await all_succeeded(chancy, hinted, timeout=polling_interval - 2, what="a NOTIFY wake-up")
    print(f"after the cuts: NOTIFY latency {time.monotonic() - pushed:.3f} s")
    refs += hinted

    rows = await all_succeeded(chancy, refs, timeout=15, what="every job")
    assert len(rows) == len(refs) == 3 * 11 + 1
    assert all(r["attempts"] == 1 for r in rows)
    assert worker.alive
    row = await worker_row(chancy, worker.worker_id)
    assert row is not None and row["alive"]
    running = await query(chancy, "SELECT count(*) AS n FROM {jobs} WHERE state = 'running'")
    assert running[0]["n"] == 0


async def test_polling_runs_jobs_without_notifications(chancy: Chancy, workers: Workers) -> None:
    await chancy.declare(
        Queue("acc", executor=Chancy.Executor.Threaded, concurrency=4, polling_interval=0.3)
    )
    worker = await workers.start(None, "--no-notifications")
    assert not any(
        row["query"].startswith("LISTEN") for row in await backends(chancy, worker.worker_id)
    )
    for batch in range(3):
        pushed = time.monotonic()
        refs = await push_adds(chancy, "acc", 5, start=5 * batch)
        rows = await all_succeeded(chancy, refs, timeout=5, what="polled jobs")
        print(f"notifications=False batch {batch}: done in {time.monotonic() - pushed:.2f} s")
        assert sorted(r["result"] for r in rows) == [i + 1 for i in range(5 * batch, 5 * batch + 5)]
    assert not any(
        row["query"].startswith("LISTEN") for row in await backends(chancy, worker.worker_id)
    )


async def test_one_leader_failover_and_release(chancy: Chancy, workers: Workers) -> None:
    started = [await workers.start() for _ in range(3)]
    by_id = {w.worker_id: w for w in started}
    samples: list[list[str]] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            rows = await chancy.get_all_workers()
            samples.append([r["worker_id"] for r in rows if r["is_leader"]])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 0.05)

    async def sampled(worker_id: str) -> bool:
        return any(worker_id in leaders for leaders in samples)

    sampler = asyncio.create_task(sample())
    try:
        first = await eventually(lambda: lease(chancy), timeout=5, what="a leader")
        leader = by_id[first["worker_id"]]
        # The sampler must have seen each leader before it goes (a loaded machine can
        # make one sample take longer than a short tenure).
        await eventually(lambda: sampled(leader.worker_id), timeout=5, what="a sample")

        killed = time.monotonic()
        leader.send(signal.SIGKILL)

        async def new_leader() -> dict[str, Any] | None:
            held = await lease(chancy)
            ok = held and held["valid"] and held["worker_id"] != leader.worker_id
            return held if ok else None

        second = await eventually(
            new_leader, timeout=LEASE_TIMEOUT + POLL_INTERVAL + 2, what="a new leader"
        )
        print(f"leader kill -9: new leader after {time.monotonic() - killed:.2f} s")
        successor = by_id[second["worker_id"]]
        await successor.line(r"^LEADER gained", 5)
        await eventually(lambda: sampled(successor.worker_id), timeout=5, what="a sample")
        # The lease as it stands just before the stop (renewed while we sampled).
        second = await eventually(new_leader, timeout=5, what="the successor's lease")
        assert second["worker_id"] == successor.worker_id

        # A clean stop releases the lease: the last worker takes it at its next poll
        # instead of waiting for the lease to expire.
        stopped = time.monotonic()
        successor.send(signal.SIGTERM)
        assert await successor.exit_code(10) == 0, successor.output()
        (last,) = [w for w in started if w not in (leader, successor)]

        async def handed_over() -> dict[str, Any] | None:
            held = await lease(chancy)
            return held if held and held["worker_id"] == last.worker_id else None

        third = await eventually(handed_over, timeout=POLL_INTERVAL + 2, what="a handover")
        print(f"leader SIGTERM: handed over after {time.monotonic() - stopped:.2f} s")
        assert third["acquired_at"] < second["expires_at"]

        last.send(signal.SIGTERM)
        assert await last.exit_code(10) == 0, last.output()
    finally:
        stop_sampling.set()
        await sampler
    assert await lease(chancy) is None
    assert [w for w in await chancy.get_all_workers() if w["worker_id"] != leader.worker_id] == []
    assert samples and all(len(leaders) <= 1 for leaders in samples)
    seen = {w for leaders in samples for w in leaders}
    assert {leader.worker_id, successor.worker_id} <= seen <= set(by_id)
    # Leadership as each process saw it: the gained/lost intervals never overlap.
    intervals = leadership_intervals(started, ends={leader.worker_id: killed})
    intervals.sort()
    for (_, end, owner), (begin, _, other) in itertools.pairwise(intervals):
        assert end <= begin, f"{owner} and {other} both led at once: {intervals}"


def leadership_intervals(
    started: list[Any], ends: dict[str, float]
) -> list[tuple[float, float, str]]:
    """(gained, lost, worker) from each worker's LEADER and STOPPING lines (monotonic clock);
    a worker killed while leading led until ``ends[worker]``."""
    intervals = []
    for process in started:
        gained: float | None = None
        for match in process.find(r"^(LEADER gained|LEADER lost|STOPPING) \S+ ([\d.]+)$"):
            kind, moment = match.group(1), float(match.group(2))
            if kind == "LEADER gained":
                gained = moment
            elif gained is not None:
                intervals.append((gained, moment, process.worker_id))
                gained = None
        if gained is not None:
            intervals.append(
                (gained, ends.get(process.worker_id, time.monotonic()), process.worker_id)
            )
    return intervals
