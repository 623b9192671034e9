"""Reliability under faults (issue 4): kill -9 under load, stubborn jobs on SIGTERM, poison
jobs among normal ones, backend-termination storms, repeated leader failover and locks or
statement timeouts. Each test has a short CI form; the ``long`` forms (scripts/chaos) run
more cycles and print ``CHAOS`` result lines.

Existing acceptance tests cover the rest of the fault list: SIGTERM within grace and the
second signal (test_acceptance_signals), SIGSTOP/SIGCONT zombies (test_acceptance_recovery),
restarts (test_acceptance_restart, test_reliability_restart). docs/reliability.md maps
every item to its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from chancy import Chancy, Job, Limit, Queue, Reference, Worker
from tests.proc import (
    HEARTBEAT_TIMEOUT,
    LEASE_TIMEOUT,
    POLL_INTERVAL,
    WorkerProcess,
    backends,
    eventually,
    job_rows,
    lease,
    query,
)
from tests.rel_proc import RelWorkers, report, run_counts
from tests.test_acceptance_connections import leadership_intervals

#: A dead worker's jobs are back in line within heartbeat timeout (lease timeout if it
#: led) + one Recovery interval; the issue allows 5 s of slack on top.
#: How long a stopped worker process waits for threads its jobs left running
#: (chancy.worker.exit_if_threads_linger, as the CLI and tests.rel_worker call it).
LINGER_MARGIN = 2.0
RECOVERY_TARGET = max(HEARTBEAT_TIMEOUT, LEASE_TIMEOUT) + POLL_INTERVAL + 5


@pytest.fixture
def workers(python: str, subprocess_env: dict[str, str]) -> Iterator[RelWorkers]:
    started = RelWorkers(python, subprocess_env)
    try:
        yield started
    finally:
        started.close()


def slow_first(path: Path, tag: str, first: float, queue: str, **fields: Any) -> Job:
    return Job(
        func="tests.rel_jobs.async_slow_first",
        queue=queue,
        kwargs={"path": str(path), "tag": tag, "first": first, "later": 0.05},
        **fields,
    )


def unaccounted_runs(
    rows: list[dict[str, Any]], refs: list[Reference], path: Path, prefix: str
) -> tuple[int, int]:
    """(duplicates, reruns) of journaled jobs tagged ``<prefix><index in refs>``.

    At-least-once allows a job to run again when its worker died before recording the
    outcome: such a rerun is a counted attempt whose predecessor failed with
    WorkerDiedError. A duplicate is a run the database does not account for: more starts
    than attempts (fewer is fine: a worker may die after claiming a job, before starting
    it), or a job that ended twice without its earlier attempt being declared dead."""
    starts, ends = run_counts(path)
    tag_of = {ref: f"{prefix}{n}" for n, ref in enumerate(refs)}
    duplicates = reruns = 0
    for row in rows:
        tag = tag_of[Reference(row["id"])]
        died = [e for e in row["errors"] if "WorkerDiedError" in e["traceback"]]
        if starts[tag] > row["attempts"] or ends[tag] > 1 + len(died):
            duplicates += 1
        elif ends[tag] > 1:
            reruns += 1
    return duplicates, reruns


async def states(chancy: Chancy, refs: list[Reference]) -> Counter[str]:
    return Counter(r["state"] for r in await job_rows(chancy, refs))


# -- 1. kill -9 a worker running 100 jobs -------------------------------------------------


async def kill_9_cycles(
    chancy: Chancy, workers: RelWorkers, tmp_path: Path, cycles: int, jobs: int
) -> None:
    await chancy.declare(
        Queue("big", executor=Chancy.Executor.Async, concurrency=jobs, polling_interval=0.2)
    )
    await chancy.declare(
        Queue("load", executor=Chancy.Executor.Async, concurrency=8, polling_interval=0.2)
    )
    path = tmp_path / "journal"
    load_path = tmp_path / "load"
    current = await workers.start()
    all_refs: list[Reference] = []
    load_refs: list[Reference] = []
    recoveries: list[float] = []
    stop_load = asyncio.Event()

    async def steady_load() -> None:
        # Quick jobs pushed all along at ~20/s: the load under which workers die.
        for n in itertools.count():
            if stop_load.is_set():
                return
            load_refs.append(
                await chancy.push(slow_first(load_path, f"l{n}", 0.02, "load", max_attempts=3))
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_load.wait(), 0.05)

    loader = asyncio.create_task(steady_load())
    try:
        for cycle in range(cycles):
            refs = [
                await chancy.push(slow_first(path, f"c{cycle}j{i}", 60, "big", max_attempts=3))
                for i in range(jobs)
            ]
            all_refs += refs

            async def all_started(cycle: int = cycle) -> bool:
                starts, _ = run_counts(path)
                return sum(1 for t in starts if t.startswith(f"c{cycle}j")) == jobs

            await eventually(all_started, timeout=20, what=f"{jobs} jobs running (cycle {cycle})")
            rows = await job_rows(chancy, refs)
            assert {r["taken_by"] for r in rows} == {current.worker_id}
            successor = await workers.start()
            killed = time.monotonic()
            current.send(signal.SIGKILL)

            async def recovered(
                refs: list[Reference] = refs, dead: str = current.worker_id
            ) -> bool:
                rows = await job_rows(chancy, refs)
                return all(r["taken_by"] != dead or r["state"] != "running" for r in rows)

            await eventually(
                recovered, timeout=RECOVERY_TARGET + 10, what="recovery", interval=0.02
            )
            recoveries.append(time.monotonic() - killed)

            async def succeeded(refs: list[Reference] = refs) -> bool:
                return (await states(chancy, refs)) == {"succeeded": len(refs)}

            await eventually(succeeded, timeout=30, what=f"cycle {cycle} jobs to succeed")
            assert await current.exit_code(5) == -signal.SIGKILL
            current = successor
    finally:
        stop_load.set()
        await loader

    async def load_done() -> bool:
        return (await states(chancy, load_refs)) == {"succeeded": len(load_refs)}

    await eventually(load_done, timeout=30, what="the steady load to finish")
    rows = await job_rows(chancy, all_refs)
    assert len(rows) == len(all_refs) == cycles * jobs
    for row in rows:
        assert (row["state"], row["attempts"]) == ("succeeded", 2), row
        assert [e["attempt"] for e in row["errors"]] == [1]
        assert "WorkerDiedError" in row["errors"][0]["traceback"]
    starts, ends = run_counts(path)
    tags = [f"c{c}j{i}" for c in range(cycles) for i in range(jobs)]
    # Attempt 1 started and was killed; attempt 2 started and ended, each exactly once.
    assert {t: starts[t] for t in tags} == dict.fromkeys(tags, 2)
    assert {t: ends[t] for t in tags} == dict.fromkeys(tags, 1)
    load_rows = await job_rows(chancy, load_refs)
    lost = len(load_refs) - len(load_rows) + sum(1 for r in load_rows if r["state"] != "succeeded")
    duplicates, reruns = unaccounted_runs(load_rows, load_refs, load_path, "l")
    assert lost == 0 and duplicates == 0
    assert max(recoveries) <= RECOVERY_TARGET, recoveries
    report(
        "kill9",
        cycles=cycles,
        jobs=cycles * jobs + len(load_refs),
        lost=lost,
        duplicates=duplicates,
        max_recovery_s=max(recoveries),
        reruns_after_kill=reruns,
    )


async def test_kill_9_worker_running_100_jobs(
    chancy: Chancy, workers: RelWorkers, tmp_path: Path
) -> None:
    await kill_9_cycles(chancy, workers, tmp_path, cycles=1, jobs=100)


@pytest.mark.long
@pytest.mark.timeout(900)
async def test_kill_9_worker_running_100_jobs_long(
    chancy: Chancy, workers: RelWorkers, tmp_path: Path
) -> None:
    await kill_9_cycles(chancy, workers, tmp_path, cycles=20, jobs=100)


# -- 2. a job that ignores cancellation cannot hold a stopping worker ---------------------


@pytest.mark.parametrize(
    "executor",
    [
        pytest.param(Chancy.Executor.Threaded, id="threaded"),
        pytest.param(Chancy.Executor.Async, id="async"),
    ],
)
async def test_cpu_loop_ignoring_cancellation_cannot_hold_the_worker_past_grace(
    chancy: Chancy, workers: RelWorkers, executor: str
) -> None:
    shutdown_timeout = 1.0
    await chancy.declare(Queue("q", executor=executor, concurrency=2, polling_interval=0.2))
    worker = await workers.start(shutdown_timeout=shutdown_timeout)
    refs = [
        await chancy.push(Job(func=func, queue="q", kwargs={"seconds": 120}, max_attempts=2))
        for func in ("tests.jobs.busy_loop", "tests.rel_jobs.cpu_loop_in_thread")
    ]

    async def running() -> bool:
        return (await states(chancy, refs)) == {"running": 2}

    await eventually(running, timeout=15, what="the CPU loops to start")
    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    # Grace, then the hard-kill margin for threads a job left behind, plus slack: two
    # CPU-bound threads contend with the worker's loop for the GIL, so its shutdown steps
    # run slower than on an idle process (the jobs would run for 120 s).
    code = await worker.exit_code(shutdown_timeout + LINGER_MARGIN + 3)
    print(f"SIGTERM with CPU loops -> exit {code} in {time.monotonic() - sent:.2f} s")
    assert code == 0, worker.output()
    rows = await job_rows(chancy, refs)
    # Handed back, the interrupted attempt not counted: another worker runs them again.
    assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 0)] * 2, rows


# -- 3. poison jobs among 200 normal ones ---------------------------------------------------


async def test_poison_jobs_beside_200_normal_jobs(chancy: Chancy, tmp_path: Path) -> None:
    await chancy.declare(
        Queue("q", executor=Chancy.Executor.Process, concurrency=4, polling_interval=0.1)
    )
    path = tmp_path / "journal"
    max_attempts = 2
    poison = {
        how: Job(
            func="tests.rel_jobs.poison",
            queue="q",
            kwargs={"path": str(path), "tag": how, "how": how},
            max_attempts=max_attempts,
            limits=[Limit(Limit.Type.MEMORY, 256 * 1024 * 1024)] if how == "memory" else [],
        )
        for how in ("exit", "segfault", "memory")
    }
    normal = [Job(func="tests.jobs.add", queue="q", kwargs={"a": i, "b": 1}) for i in range(200)]
    jobs = normal[:100] + list(poison.values()) + normal[100:]
    refs = [r async for batch in chancy.push_many(jobs) for r in batch]
    poison_refs = dict(zip(poison, refs[100:103], strict=True))
    async with Worker(chancy, register_signal_handlers=False) as worker:
        done = {j.id: j for j in await chancy.wait_for_jobs(refs, interval=0.1, timeout=60)}
        assert not worker.stopping.is_set()
    normal_refs = refs[:100] + refs[103:]
    assert [(done[r].state, done[r].attempts, done[r].result) for r in normal_refs] == [
        ("succeeded", 1, i + 1) for i in range(200)
    ]
    starts, _ = run_counts(path)
    for how, ref in poison_refs.items():
        job = done[ref]
        assert (job.state, job.attempts) == ("failed", max_attempts), job
        assert starts[how] == max_attempts
        assert [e["attempt"] for e in job.errors] == list(range(1, max_attempts + 1))
        expected = "MemoryError" if how == "memory" else "WorkerDiedError"
        assert all(expected in e["traceback"] for e in job.errors), job.errors


# -- 4. pg_terminate_backend storms ------------------------------------------------------


async def listening_since(chancy: Chancy, worker_id: str, since: Any) -> bool:
    return any(
        row["query"].startswith("LISTEN") and row["backend_start"] > since
        for row in await backends(chancy, worker_id)
    )


async def terminate_storm(
    chancy: Chancy, workers: RelWorkers, tmp_path: Path, seconds: float, period: float
) -> None:
    await chancy.declare(
        Queue("q", executor=Chancy.Executor.Async, concurrency=8, polling_interval=0.5)
    )
    worker = await workers.start()
    path = tmp_path / "journal"
    refs: list[Reference] = []
    kills = Counter[str]()
    end = time.monotonic() + seconds
    storm_started = time.monotonic()

    async def pusher() -> None:
        n = 0
        while time.monotonic() < end:
            refs.append(await chancy.push(slow_first(path, f"j{n}", 0.05, "q", max_attempts=3)))
            n += 1
            await asyncio.sleep(0.05)

    async def storm() -> None:
        for round_ in itertools.count():
            if time.monotonic() >= end:
                return
            rows = await backends(chancy, worker.worker_id)
            if round_ % 2:  # the LISTEN connection alone
                victims = [r["pid"] for r in rows if r["query"].startswith("LISTEN")]
                kills["listen"] += len(victims)
            else:  # every backend of the worker
                victims = [r["pid"] for r in rows]
                kills["all"] += len(victims)
            await query(
                chancy,
                "SELECT pg_terminate_backend(pid) FROM unnest(%(p)s::int[]) AS pid",
                {"p": victims},
            )
            await asyncio.sleep(period)

    await asyncio.gather(pusher(), storm())
    (calm,) = await query(chancy, "SELECT now() AS t")
    assert worker.alive, worker.output()
    # LISTEN is re-established after the storm...
    await eventually(
        lambda: listening_since(
            chancy, worker.worker_id, calm["t"] - dt.timedelta(seconds=period + 1)
        ),
        timeout=15,
        what="LISTEN after the storm",
    )

    async def all_done() -> bool:
        return (await states(chancy, refs)) == {"succeeded": len(refs)}

    await eventually(all_done, timeout=30, what="every job pushed during the storm")
    # ...and a job pushed now is still picked up.
    last = await chancy.push(slow_first(path, "after", 0.0, "q"))
    await chancy.wait_for_job(last, timeout=10)
    rows = await job_rows(chancy, refs)
    # The worker never died here, so no job may run twice (reruns count as duplicates).
    duplicates, reruns = unaccounted_runs(rows, refs, path, "j")
    duplicates += reruns
    lost = len(refs) - sum(1 for r in rows if r["state"] == "succeeded")
    assert lost == 0 and duplicates == 0
    assert worker.alive and not worker.find(r"^STOPPING")
    assert kills["all"] > 0 and kills["listen"] > 0
    report(
        "storm",
        seconds=round(time.monotonic() - storm_started, 1),
        jobs=len(refs),
        backends_killed=sum(kills.values()),
        lost=lost,
        duplicates=duplicates,
    )


async def test_terminate_backend_storm(chancy: Chancy, workers: RelWorkers, tmp_path: Path) -> None:
    await terminate_storm(chancy, workers, tmp_path, seconds=8, period=1.0)


@pytest.mark.long
@pytest.mark.timeout(600)
async def test_terminate_backend_storm_long(
    chancy: Chancy, workers: RelWorkers, tmp_path: Path
) -> None:
    await terminate_storm(chancy, workers, tmp_path, seconds=90, period=2.0)


# -- 8. leader failover, repeatedly -----------------------------------------------------


async def leader_failovers(chancy: Chancy, workers: RelWorkers, rounds: int) -> None:
    alive: list[WorkerProcess] = [await workers.start() for _ in range(3)]
    everyone = list(alive)
    killed_at: dict[str, float] = {}
    failovers: list[float] = []
    samples: list[tuple[str, bool]] = []
    orphans: dict[Reference, str] = {}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            held = await lease(chancy)
            if held is not None:
                samples.append((held["worker_id"], held["valid"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    sampler = asyncio.create_task(sample())
    try:
        for round_ in range(rounds):
            held = await eventually(
                lambda: lease(chancy), timeout=LEASE_TIMEOUT + 5, what="a leader"
            )
            (leader,) = [w for w in alive if w.worker_id == held["worker_id"]]
            # Give the leader running jobs on a queue only it serves: their recovery is
            # the maintenance that must happen exactly once.
            name = f"lead{round_}"
            await chancy.declare(
                Queue(
                    name,
                    executor=Chancy.Executor.Async,
                    concurrency=2,
                    polling_interval=0.2,
                    tags={f"worker_id={leader.worker_id}"},
                )
            )
            refs = [
                await chancy.push(
                    Job(
                        func="tests.jobs.async_sleep",
                        queue=name,
                        kwargs={"seconds": 60},
                        max_attempts=2,
                    )
                )
                for _ in range(2)
            ]

            async def running(refs: list[Reference] = refs) -> bool:
                return (await states(chancy, refs)) == {"running": 2}

            await eventually(running, timeout=15, what="the leader's jobs")
            orphans.update(dict.fromkeys(refs, leader.worker_id))
            killed_at[leader.worker_id] = time.monotonic()
            leader.send(signal.SIGKILL)
            alive.remove(leader)

            async def new_leader(dead: str = leader.worker_id) -> Any:
                held = await lease(chancy)
                return held if held and held["valid"] and held["worker_id"] != dead else None

            await eventually(new_leader, timeout=LEASE_TIMEOUT + 5, what="a new leader")
            failovers.append(time.monotonic() - killed_at[leader.worker_id])

            async def recovered(refs: list[Reference] = refs) -> bool:
                return (await states(chancy, refs)) == {"retrying": 2}

            await eventually(recovered, timeout=RECOVERY_TARGET + 5, what="recovery")
            replacement = await workers.start()
            alive.append(replacement)
            everyone.append(replacement)
    finally:
        stop.set()
        await sampler
    assert max(failovers) <= LEASE_TIMEOUT + POLL_INTERVAL + 2, failovers
    # Never two leaders at once: each process's own view of its leadership (gained/lost
    # lines on one clock) never overlaps another's, and the lease never names a worker
    # that was already dead while valid.
    intervals = sorted(leadership_intervals(everyone, ends=killed_at))
    for (_, end, owner), (begin, _, other) in itertools.pairwise(intervals):
        assert end <= begin, f"{owner} and {other} both led at once"
    assert samples
    # No duplicate maintenance: every orphan was recovered by exactly one worker, once.
    recovered_by = Counter(
        m.group(1) for w in everyone for m in w.find(r"^RECOVERED (\S+) retrying")
    )
    assert {Reference(k): v for k, v in recovered_by.items() if Reference(k) in orphans} == (
        dict.fromkeys(orphans, 1)
    )
    for row in await job_rows(chancy, list(orphans)):
        assert len(row["errors"]) == 1, row["errors"]
    report("failover", rounds=rounds, max_failover_s=max(failovers), lease_samples=len(samples))


async def test_leader_kill_9_repeatedly(chancy: Chancy, workers: RelWorkers) -> None:
    await leader_failovers(chancy, workers, rounds=2)


@pytest.mark.long
@pytest.mark.timeout(900)
async def test_leader_kill_9_repeatedly_long(chancy: Chancy, workers: RelWorkers) -> None:
    await leader_failovers(chancy, workers, rounds=15)


# -- 9. locks and statement timeouts ---------------------------------------------------


def left_in_transaction(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Backends idle inside a transaction for over a second.

    A live transaction is briefly "idle in transaction" between its statements (one client
    round trip, e.g. right after BEGIN), so only a transaction left open counts.
    """
    return [
        r for r in rows if r["state"].startswith("idle in transaction") and r["state_age"] > 1.0
    ]


@pytest.mark.parametrize("statement_timeout", [None, "300ms"], ids=["no-timeout", "timeout"])
async def test_table_lock_held_for_seconds(
    chancy: Chancy,
    python: str,
    subprocess_env: dict[str, str],
    statement_timeout: str | None,
) -> None:
    env = dict(subprocess_env)
    if statement_timeout:
        env["REL_DSN"] = env["CHANCY_TEST_DSN_SCHEMA"].replace(
            "options='", f"options='-c statement_timeout={statement_timeout} "
        )
        assert env["REL_DSN"] != env["CHANCY_TEST_DSN_SCHEMA"]
    else:
        env["REL_DSN"] = env["CHANCY_TEST_DSN_SCHEMA"]
    await chancy.declare(
        Queue("q", executor=Chancy.Executor.Async, concurrency=4, polling_interval=0.2)
    )
    workers = RelWorkers(python, env)
    try:
        worker = await workers.start(dsn_env="REL_DSN")
        before = [await chancy.push(Job(func="tests.jobs.noop", queue="q")) for _ in range(3)]
        await chancy.wait_for_jobs(before, timeout=10)
        during = [await chancy.push(Job(func="tests.jobs.noop", queue="q")) for _ in range(5)]
        in_transaction: list[Any] = []
        async with chancy.pool.connection() as conn, conn.transaction():
            await conn.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(chancy.prefix + "jobs")
                )
            )
            held = time.monotonic()
            while time.monotonic() - held < 3:
                in_transaction += left_in_transaction(await backends(chancy, worker.worker_id))
                await asyncio.sleep(0.1)
        released = time.monotonic()
        done = await chancy.wait_for_jobs(during, timeout=15)
        print(f"lock released: jobs done {time.monotonic() - released:.2f} s later")
        assert {j.state for j in done} == {"succeeded"} and len(done) == 5
        # A leaked transaction stays idle: sample long enough for one that began at the
        # release to pass the age threshold.
        sampled = time.monotonic()
        while time.monotonic() - sampled < 1.5:
            in_transaction += left_in_transaction(await backends(chancy, worker.worker_id))
            await asyncio.sleep(0.05)
        assert in_transaction == []
        assert worker.alive, worker.output()
        if statement_timeout:
            # The worker's statements were cancelled and its loops backed off and retried.
            assert "statement timeout" in worker.output() or "canceling statement" in (
                worker.output()
            ), worker.output()
        after = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        final = await chancy.wait_for_job(after, timeout=10)
        assert final is not None and final.state == "succeeded"
    finally:
        workers.close()
