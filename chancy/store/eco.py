"""Store operations for the ecosystem helpers (:mod:`chancy.testing`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from chancy.job import QueuedJob
from chancy.store import Op, Store, dumps, row_to_job


def due_queues(store: Store) -> Op[list[str]]:
    """Names of the queues that hold jobs due now."""
    rows = yield store.q("eco_select_due_queues"), None
    return [row["queue"] for row in rows]


def matching_jobs(
    store: Store,
    *,
    func: str | None = None,
    queue: str | None = None,
    states: Iterable[str] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    limit: int = 1000,
) -> Op[list[QueuedJob]]:
    """Jobs of ``func`` in ``queue`` and ``states`` whose kwargs include ``kwargs``."""
    params = {
        "func": func,
        "queue": queue,
        "states": list(states) if states is not None else None,
        "kwargs": dumps(kwargs, "kwargs filter") if kwargs is not None else None,
        "limit": limit,
    }
    rows = yield store.q("eco_select_jobs_matching"), params
    return [row_to_job(row) for row in rows]
