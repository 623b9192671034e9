"""Progress reported by running jobs: visible through get_job, written at most once per
progress_interval, claim-guarded, announced to plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chancy import Chancy, Job, Limit, Queue, QueuedJob, Worker, report_progress
from chancy.errors import ConfigurationError, JobValidationError
from chancy.plugin import Plugin
from chancy.store import arun
from tests.test_worker import poll, serving


class Recorder(Plugin):
    """Collects on_job_updated calls."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    def get_identifier(cls) -> str:
        return "tests.recorder"

    async def on_job_updated(self, worker: Worker, job: QueuedJob, changes: dict[str, Any]) -> None:
        self.updates.append((str(job.id), changes))


@pytest.mark.parametrize(
    "executor,func",
    [
        (Chancy.Executor.Async, "tests.jobs_jobs.async_progress_gated"),
        (Chancy.Executor.Async, "tests.jobs_jobs.progress_gated"),
        (Chancy.Executor.Threaded, "tests.jobs_jobs.progress_gated"),
        (Chancy.Executor.Process, "tests.jobs_jobs.progress_gated"),
    ],
)
async def test_running_job_progress_is_visible_and_hooked(
    dsn: str, tmp_path: Path, executor: str, func: str
) -> None:
    recorder = Recorder()
    async with Chancy(dsn, plugins=[recorder]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=executor))
        gate = tmp_path / "gate"
        ref = await app.push(Job(func=func, queue="q", kwargs={"gate": str(gate)}))
        half = {"percent": 50.0, "message": "half way"}
        async with serving(app, progress_interval=0.05):

            async def shows_half() -> bool:
                job = await app.get_job(ref)
                return job is not None and job.state == "running" and job.progress == half

            await poll(shows_half)
            await poll(lambda: recorder.updates)
            gate.touch()
            job = await app.wait_for_job(ref, timeout=20)
    assert recorder.updates[0] == (str(ref), {"progress": half})
    # The last report goes with the outcome, even if no progress write came after it.
    assert job is not None and job.state == "succeeded"
    assert job.progress == {"percent": 100.0, "message": "done"}


@pytest.mark.parametrize("executor", [Chancy.Executor.Threaded, Chancy.Executor.Process])
async def test_progress_writes_are_rate_limited(dsn: str, executor: str) -> None:
    recorder = Recorder()
    async with Chancy(dsn, plugins=[recorder]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=executor))
        ref = await app.push(
            Job(func="tests.jobs_jobs.progress_storm", queue="q", kwargs={"count": 20_000})
        )
        # With an hour between writes, 20,000 reports make at most one write while the
        # job runs; the final report is written with the outcome.
        async with serving(app, progress_interval=3600):
            job = await app.wait_for_job(ref, timeout=30)
    assert job is not None and job.result == 20_000
    assert len(recorder.updates) <= 1
    assert job.progress == {"percent": 100.0, "message": "step 20000"}


async def test_progress_write_is_claim_guarded(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    async with chancy.pool.connection() as conn:
        [job] = await arun(conn, chancy.store.fetch_jobs("q", "w1", 1))
        update = [(job, {"percent": 10.0, "message": None})]
        assert await arun(conn, chancy.store.update_progress("someone-else", update)) == set()
        assert await arun(conn, chancy.store.update_progress("w1", update)) == {ref}
    stored = await chancy.get_job(ref)
    assert stored is not None and stored.progress == {"percent": 10.0, "message": None}


def test_report_progress_outside_a_job_does_nothing() -> None:
    assert report_progress(10, "nobody listens") is False


@pytest.mark.parametrize(
    "percent,message",
    [(-1, None), (101, None), (float("nan"), None), ("50", None), (True, None), (5, 7)],
)
def test_report_progress_validates(percent: object, message: object) -> None:
    with pytest.raises(JobValidationError):
        report_progress(percent, message)  # type: ignore[arg-type]


def test_progress_interval_is_validated(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="progress_interval"):
        Worker(Chancy(dsn), progress_interval=0)


async def test_time_limit_during_progress_reports_keeps_the_pipe_intact(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Process, concurrency=1))
    async with serving(chancy, progress_interval=0.05):
        refs = [
            await chancy.push(
                Job(
                    func="tests.jobs_jobs.progress_until_stopped",
                    queue="q",
                    limits=[Limit(Limit.Type.TIME, 0.3)],
                )
            )
            for _ in range(3)
        ]
        after = await chancy.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": 1, "b": 1}))
        jobs = await chancy.wait_for_jobs([*refs, after], timeout=60)
    by_id = {job.id: job for job in jobs}
    assert all("JobTimeoutError" in by_id[r].errors[-1]["traceback"] for r in refs)
    # The same child ran the next job: its pipe still frames messages correctly.
    assert by_id[after].state == "succeeded" and by_id[after].result == 2
