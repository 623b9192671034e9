"""Job functions for the ecosystem tests (testing helpers, OpenTelemetry, logging)."""

from __future__ import annotations

import logging

from chancy import Chancy, Job, QueuedJob, Snooze, job

calls: list[tuple[str, object]] = []
log = logging.getLogger("tests.jobs_eco")


@job(queue="eco")
def record(*, value: int) -> int:
    calls.append(("record", value))
    return value * 2


@job(queue="eco")
async def arecord(*, value: int) -> int:
    calls.append(("arecord", value))
    return value + 1


@job(queue="eco", max_attempts=3)
def flaky(*, fail_times: int, job: QueuedJob) -> int:
    if job.attempts <= fail_times:
        raise RuntimeError(f"attempt {job.attempts} failed")
    return job.attempts


def snooze_once(*, job: QueuedJob) -> str:
    if not job.meta.get("snoozed"):
        job.meta["snoozed"] = True  # type: ignore[index]
        raise Snooze(0)
    return "woke"


def chain(*, dsn: str, value: int) -> None:
    """Pushes a follow-up job (run_pending must run it too)."""
    with Chancy(dsn) as chancy:
        chancy.sync_push(record.job.with_kwargs(value=value))


def logs_something(*, message: str) -> str:
    log.warning("inside %s", message)
    return message


async def alogs_something(*, message: str) -> str:
    log.warning("inside async %s", message)
    return message


def child_job() -> Job:
    return Job(func="tests.jobs_eco.record", queue="eco", kwargs={"value": 1})
