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


initialized: list[str] = []


def mark_child() -> None:
    """A Process executor ``initializer``: runs once in each child before its first job."""
    initialized.append("yes")


def context_seen_in_child() -> dict[str, object]:
    """Log a record through a filtered handler and return what it carried."""
    from chancy.contrib.logging import JobContextFilter

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    handler.addFilter(JobContextFilter())
    child_log = logging.getLogger("tests.jobs_eco.child")
    child_log.addHandler(handler)
    try:
        child_log.warning("from the child")
    finally:
        child_log.removeHandler(handler)
    record = seen[0]
    return {
        "job_id": record.chancy_job_id,  # type: ignore[attr-defined]
        "queue": record.chancy_queue,  # type: ignore[attr-defined]
        "func": record.chancy_func,  # type: ignore[attr-defined]
        "attempt": record.chancy_attempt,  # type: ignore[attr-defined]
        "initialized": list(initialized),
    }


def record_pair(*, value: int, x: int = 0) -> int:
    return value + x
