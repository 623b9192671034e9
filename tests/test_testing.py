"""chancy.testing: inline runs recorded like a worker's, push assertions, inline mode, and
the pytest plugin's fixtures."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from chancy import Chancy, Job, Queue, QueuedJob
from chancy.testing import (
    TESTING_WORKER_ID,
    assert_not_pushed,
    assert_pushed,
    inline,
    run_pending,
    sync_assert_pushed,
    sync_run_pending,
)
from tests import jobs_eco

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    jobs_eco.calls.clear()


async def test_run_pending_runs_sync_and_async_jobs_and_records_results(chancy: Chancy) -> None:
    await chancy.declare(Queue("eco"))
    first = await chancy.push(jobs_eco.record.job.with_kwargs(value=3))
    second = await chancy.push(jobs_eco.arecord.job.with_kwargs(value=5))
    ran = await run_pending(chancy)
    assert [job.id for job in ran] == [first, second]
    assert [(job.state, job.result) for job in ran] == [("succeeded", 6), ("succeeded", 6)]
    assert all(job.taken_by == TESTING_WORKER_ID and job.attempts == 1 for job in ran)
    assert jobs_eco.calls == [("record", 3), ("arecord", 5)]
    assert await run_pending(chancy) == []


async def test_run_pending_retries_until_max_attempts_and_keeps_errors(chancy: Chancy) -> None:
    await chancy.declare(Queue("eco"))
    ok = await chancy.push(jobs_eco.flaky.job.with_kwargs(fail_times=2))
    bad = await chancy.push(jobs_eco.flaky.job.with_kwargs(fail_times=5))
    jobs = {job.id: job for job in await run_pending(chancy, "eco")}
    assert jobs[ok].state == QueuedJob.State.SUCCEEDED and jobs[ok].result == 3
    assert jobs[bad].state == QueuedJob.State.FAILED and jobs[bad].attempts == 3
    assert [e["attempt"] for e in jobs[bad].errors] == [1, 2, 3]
    assert "RuntimeError: attempt 3 failed" in jobs[bad].errors[-1]["traceback"]


async def test_run_pending_follows_pushed_jobs_snoozes_and_skips_other_queues(
    chancy: Chancy, dsn: str
) -> None:
    for name in ("eco", "other"):
        await chancy.declare(Queue(name))
    await chancy.push(
        Job(func="tests.jobs_eco.chain", queue="other", kwargs={"dsn": dsn, "value": 7})
    )
    snoozer = await chancy.push(Job(func="tests.jobs_eco.snooze_once", queue="eco"))
    later = await chancy.push(
        jobs_eco.record.job.with_kwargs(value=1).with_scheduled_at(
            dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
        )
    )
    ran = await run_pending(chancy, "eco")
    assert [job.id for job in ran] == [snoozer]
    assert ran[0].state == "succeeded" and ran[0].result == "woke" and ran[0].attempts == 1
    ran = await run_pending(chancy)
    assert [job.func for job in ran] == ["tests.jobs_eco.chain", "tests.jobs_eco.record"]
    assert jobs_eco.calls == [("record", 7)]
    assert (await chancy.get_job(later)).state == "pending"  # type: ignore[union-attr]


async def test_assert_pushed_matches_func_kwargs_subset_queue_and_count(chancy: Chancy) -> None:
    await chancy.declare(Queue("eco"))
    pair = "tests.jobs_eco.record_pair"
    await chancy.push(Job(func=pair, queue="eco", kwargs={"value": 1, "x": 2}))
    await chancy.push(Job(func=pair, queue="eco", kwargs={"value": 2, "x": 2}))
    found = await assert_pushed(chancy, pair, kwargs={"value": 1})
    assert [dict(job.kwargs) for job in found] == [{"value": 1, "x": 2}]
    await assert_pushed(chancy, pair, kwargs={"x": 2}, count=2)
    await chancy.push(jobs_eco.record.job.with_kwargs(value=1))
    await chancy.push(jobs_eco.record.job.with_kwargs(value=2))
    await assert_pushed(chancy, "tests.jobs_eco.record", count=2, queue="eco")
    await assert_pushed(chancy, jobs_eco.record.func, states=["pending"], count=2)
    await assert_not_pushed(chancy, jobs_eco.record, kwargs={"value": 3})
    with pytest.raises(AssertionError, match="expected at least one job"):
        await assert_pushed(chancy, jobs_eco.arecord)
    with pytest.raises(AssertionError, match="expected 1 job"):
        await assert_pushed(chancy, jobs_eco.record, count=1)
    with pytest.raises(AssertionError):
        await assert_not_pushed(chancy, jobs_eco.record)


async def test_inline_mode_runs_pushed_jobs_at_once_and_restores_push(chancy: Chancy) -> None:
    await chancy.declare(Queue("eco"))
    with inline(chancy):
        ref = await chancy.push(jobs_eco.record.job.with_kwargs(value=4))
        assert jobs_eco.calls == [("record", 4)]
        batches = [
            refs async for refs in chancy.push_many([jobs_eco.arecord.job.with_kwargs(value=1)])
        ]
        assert jobs_eco.calls[-1] == ("arecord", 1)
    job = await chancy.get_job(ref)
    assert job is not None and job.state == "succeeded" and job.result == 8
    done = await chancy.get_jobs(batches[0])
    assert [j.state for j in done] == ["succeeded"]
    await chancy.push(jobs_eco.record.job.with_kwargs(value=9))
    assert ("record", 9) not in jobs_eco.calls


def test_sync_twins(dsn: str) -> None:
    app = Chancy(dsn)
    with app:
        app.sync_migrate()
        app.sync_declare(Queue("eco"))
        with inline(app):
            ref = app.sync_push(jobs_eco.arecord.job.with_kwargs(value=1))
        assert app.sync_get_job(ref).result == 2  # type: ignore[union-attr]
        app.sync_push(jobs_eco.record.job.with_kwargs(value=5))
        sync_assert_pushed(app, jobs_eco.record, kwargs={"value": 5}, states=["pending"])
        assert [job.result for job in sync_run_pending(app)] == [10]


def test_pytest_plugin_fixtures_give_each_test_a_migrated_isolated_app(
    pytester: pytest.Pytester, base_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHANCY_TEST_DSN", base_dsn)
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest
            from chancy import Job, Queue
            from chancy.testing import run_pending, sync_assert_pushed

            @pytest.mark.parametrize("n", [1, 2])
            def test_isolated(chancy_app, n):
                chancy_app.sync_declare(Queue("q"))
                chancy_app.sync_push(Job(func="json.dumps", queue="q", kwargs={"obj": n}))
                sync_assert_pushed(chancy_app, "json.dumps", count=1)

            async def test_async(chancy_app):
                async with chancy_app:
                    chancy_app.sync_declare(Queue("q"))
                    await chancy_app.push(Job(func="json.dumps", queue="q", kwargs={"obj": 1}))
                    [job] = await run_pending(chancy_app)
                    assert job.result == "1"
            """
        )
    )
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
