"""Structured logging: records emitted while a job runs carry its id, queue, function and
attempt, in every executor; records outside a job carry None."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from chancy import Chancy, Job, Queue
from chancy.contrib.logging import FIELDS, JobContextFilter, install, job_context
from chancy.testing import run_pending
from tests.test_worker import serving


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(JobContextFilter())
    logger = logging.getLogger("tests.jobs_eco")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def fields(record: logging.LogRecord) -> tuple[object, ...]:
    return tuple(getattr(record, name) for name in FIELDS)


@pytest.mark.parametrize("executor", [Chancy.Executor.Threaded, Chancy.Executor.Async])
async def test_records_inside_jobs_carry_the_job(
    chancy: Chancy, captured: list[logging.LogRecord], executor: str
) -> None:
    await chancy.declare(Queue("eco", executor=executor))
    sync_ref = await chancy.push(
        Job(func="tests.jobs_eco.logs_something", queue="eco", kwargs={"message": "s"})
    )
    refs = [sync_ref]
    if executor == Chancy.Executor.Async:
        refs.append(
            await chancy.push(
                Job(func="tests.jobs_eco.alogs_something", queue="eco", kwargs={"message": "a"})
            )
        )
    async with serving(chancy):
        await chancy.wait_for_jobs(refs, timeout=30)
    logging.getLogger("tests.jobs_eco").warning("outside")
    by_message = {record.getMessage(): record for record in captured}
    assert fields(by_message["inside s"]) == (
        str(sync_ref),
        "eco",
        "tests.jobs_eco.logs_something",
        1,
    )
    if len(refs) == 2:
        assert fields(by_message["inside async a"]) == (
            str(refs[1]),
            "eco",
            "tests.jobs_eco.alogs_something",
            1,
        )
    assert fields(by_message["outside"]) == (None, None, None, None)


async def test_process_children_tag_records_and_run_the_initializer(chancy: Chancy) -> None:
    await chancy.declare(
        Queue(
            "eco",
            executor=Chancy.Executor.Process,
            concurrency=1,
            executor_options={"initializer": "tests.jobs_eco.mark_child"},
        )
    )
    ref = await chancy.push(Job(func="tests.jobs_eco.context_seen_in_child", queue="eco"))
    async with serving(chancy):
        job = await chancy.wait_for_job(ref, timeout=60)
    assert job is not None and job.state == "succeeded", job
    assert job.result == {
        "job_id": str(ref),
        "queue": "eco",
        "func": "tests.jobs_eco.context_seen_in_child",
        "attempt": 1,
        "initialized": ["yes"],
    }


async def test_install_tags_every_record_and_run_pending_restores_context(
    chancy: Chancy,
) -> None:
    install()
    install()  # idempotent
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tests.jobs_eco")
    logger.addHandler(handler)
    try:
        await chancy.declare(Queue("eco"))
        ref = await chancy.push(
            Job(func="tests.jobs_eco.logs_something", queue="eco", kwargs={"message": "r"})
        )
        await run_pending(chancy)
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    assert fields(records[0])[:2] == (str(ref), "eco")
    assert fields(records[1]) == (None, None, None, None)
    assert job_context() == dict.fromkeys(FIELDS)
