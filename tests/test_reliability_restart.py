"""PostgreSQL restarts under steady pushing (issue 4, item 5), on the throwaway cluster of
tests/test_acceptance_restart.py: every push that returned a Reference exists afterwards,
every push that failed raised a connection error (never hung, never lied), and the worker
finishes every job."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from chancy import Chancy, Job, Reference
from tests.pgcluster import PgCluster
from tests.rel_proc import report
from tests.test_acceptance_restart import (  # noqa: F401  (fixtures)
    MODES,
    RECOVERY_DEADLINE,
    app,
    assert_alive,
    cluster,
    db_dsn,
    finished,
    worker_for,
)


@pytest.mark.parametrize("mode", MODES)
async def test_pushes_across_a_restart_are_all_kept_or_refused(
    cluster: PgCluster,  # noqa: F811
    app: Chancy,  # noqa: F811
    mode: str,
) -> None:
    app.pool.timeout = 2.0  # a push waits at most this long for a connection
    accepted: list[Reference] = []
    refused: list[BaseException] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def pusher() -> None:
        nonlocal slowest
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                accepted.append(
                    await app.push(
                        Job(func="tests.jobs.add", queue="work", kwargs={"a": n, "b": 0})
                    )
                )
            except (psycopg.OperationalError, PoolTimeout) as exc:
                refused.append(exc)
                await asyncio.sleep(0.05)
            slowest = max(slowest, time.monotonic() - started)
            n += 1
            await asyncio.sleep(0.01)

    async with worker_for(app) as worker:
        pushers = [asyncio.create_task(pusher()) for _ in range(3)]
        await asyncio.sleep(0.5)
        before = len(accepted)
        await asyncio.to_thread(cluster.restart, mode)
        back = time.monotonic()
        # Keep pushing until pushes succeed again for a while.
        while len(accepted) < before + 30:
            assert time.monotonic() - back < RECOVERY_DEADLINE, "pushes did not resume"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*pushers)
        assert_alive(worker)
        jobs = await finished(app, accepted, RECOVERY_DEADLINE + 10)
        assert_alive(worker)
    # Every accepted push exists and ran; the refused ones raised connection errors only.
    assert {j.id for j in jobs} == set(accepted), "a job whose push returned is missing"
    assert {j.state for j in jobs} == {"succeeded"}
    assert slowest < app.pool.timeout + 5
    for exc in refused:
        assert isinstance(exc, psycopg.OperationalError | PoolTimeout)
        assert str(exc)
    report(f"restart-{mode}", pushed=len(accepted), refused=len(refused), slowest_push_s=slowest)
