"""What a benchmarked system offers the scenarios: pushing, a worker command line, and the
read-only SQL the harness uses to watch progress. Raw and Chancy implement it."""

from __future__ import annotations

import abc
from typing import Any


class System(abc.ABC):
    """One queue implementation set up in one scratch schema."""

    #: Short name used in tables and JSON.
    name: str
    #: ``SELECT count(*)`` of jobs not yet finished.
    live_sql: str
    #: ``SELECT count(*)`` of jobs waiting to be picked up (the backlog).
    pending_sql: str
    #: ``SELECT count(*), first start, last end`` of jobs finished at or after ``%s``.
    span_sql: str
    #: ``SELECT count(*), p50, p99, max`` of (started - created) in seconds of jobs
    #: finished at or after ``%s``.
    latency_sql: str
    #: Insert ``%s`` already-finished jobs (the "history").
    history_sql: str
    #: Insert ``%s`` jobs that wait far in the future (never due during a run).
    future_sql: str
    #: Delete the jobs ``future_sql`` inserted.
    delete_future_sql: str

    @abc.abstractmethod
    async def open(self, dsn: str) -> None:
        """Install the schema in the (empty) scratch schema behind ``dsn``; get ready to
        push."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def push_one(self, kwargs: dict[str, Any], *, stamp: bool = False) -> None:
        """Enqueue one job in its own transaction (``stamp``: the pickup probe job)."""

    @abc.abstractmethod
    async def push_bulk(self, kwargs: list[dict[str, Any]], batch: int) -> None:
        """Enqueue many jobs with the system's bulk path, ``batch`` per statement."""

    @abc.abstractmethod
    def worker_args(self, dsn: str, *, stamp: bool = False) -> list[str]:
        """Arguments of ``python -m bench.worker_main`` for a worker of this system."""

    async def describe_fetch(self, conn: Any) -> dict[str, Any]:
        """An EXPLAIN of the fetch statement, if the system can show one."""
        return {}
