"""Job functions for the retry, result, progress, serialisation and transactional-complete
tests (importable by workers and child processes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import psycopg

from chancy import QueuedJob, Snooze, job, report_progress


class FlakyServiceError(RuntimeError):
    """A custom exception, matched by import path across the process pipe."""


def raise_named(name: str) -> None:
    errors: dict[str, type[BaseException]] = {
        "ValueError": ValueError,
        "KeyError": KeyError,
        "FlakyServiceError": FlakyServiceError,
    }
    raise errors[name]("raised on purpose")


def snooze_first(delay: float, *, job: QueuedJob) -> int:
    if not job.meta.get("snoozed"):
        job.meta["snoozed"] = True
        raise Snooze(delay)
    return job.attempts


async def async_snooze_first(delay: float, *, job: QueuedJob) -> int:
    await asyncio.sleep(0)
    return snooze_first(delay, job=job)


def sized_result(size: int) -> str:
    return "x" * size


def wait_for_file(path: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


async def async_wait_for_file(path: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):  # noqa: ASYNC240 - one stat per poll in a test job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


def progress_gated(gate: str) -> str:
    report_progress(50, "half way")
    wait_for_file(gate)
    report_progress(100, "done")
    return "finished"


async def async_progress_gated(gate: str) -> str:
    report_progress(50, "half way")
    await async_wait_for_file(gate)
    report_progress(100, "done")
    return "finished"


def progress_storm(count: int) -> int:
    for index in range(count):
        report_progress(100 * (index + 1) / count, f"step {index + 1}")
    return count


async def insert_order(order_id: int, *, conn: psycopg.AsyncConnection[Any]) -> int:
    await conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    return order_id


async def insert_order_then_fail(order_id: int, *, conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    raise RuntimeError("after the insert")


async def insert_order_gated(
    order_id: int, gate: str, *, conn: psycopg.AsyncConnection[Any], job: QueuedJob
) -> int:
    await conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    await async_wait_for_file(gate)
    return order_id


def insert_order_sync(order_id: int, *, conn: psycopg.Connection[Any]) -> int:
    conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    return order_id


def insert_order_sync_gated(order_id: int, gate: str, *, conn: psycopg.Connection[Any]) -> int:
    conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    wait_for_file(gate)
    return order_id


def insert_order_sync_then_fail(order_id: int, *, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    raise RuntimeError("after the insert")


@job(queue="checked")
def checked(a: int, b: int = 2, *, job: QueuedJob) -> int:
    return a + b


@job(queue="checked")
def checked_any(a: int, **rest: Any) -> int:
    return a + len(rest)


def unchecked(a: int) -> int:
    return a


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def kwarg_types(**kwargs: Any) -> dict[str, str]:
    return {name: type(value).__name__ for name, value in kwargs.items()}


async def insert_order_big_result(order_id: int, *, conn: psycopg.AsyncConnection[Any]) -> str:
    await conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
    return "x" * 10_000


def progress_until_stopped() -> None:
    """Reports progress as fast as it can until its time limit stops it."""
    step = 0
    while True:
        step += 1
        report_progress(step % 101, "x" * 500)


@job(queue="checked")
def typed(count: int, names: list[str], ratio: float = 1.0, *, job: QueuedJob) -> int:
    return count


@job(queue="checked")
def typed_when(when: dt.datetime) -> str:
    return when.isoformat()
