"""Store operations for the dashboard: bounded job listing with keyset pagination,
queue and throughput counts, workers, and bulk job actions.

Each operation is a generator in the style of :class:`chancy.store.Store` methods; run it
with ``chancy._run(op)`` or :func:`chancy.store.arun`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from chancy.errors import ChancyError
from chancy.job import QueuedJob, Reference
from chancy.store import Op, Row, Store

#: Largest page a caller may ask for.
MAX_PAGE = 500
#: Rows one page may read to find its matches (the cost bound of a filtered page).
DEFAULT_SCAN = 20_000
MAX_SCAN = 200_000
#: Longest free-text search string.
MAX_TEXT = 200
#: Most jobs one bulk action touches.
MAX_BULK = 1000
_MAX_UUID = uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")


class WebQueryError(ChancyError):
    """A dashboard listing parameter is invalid (unknown state, bad cursor, too long)."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobFilter:
    """What the job list shows: states, queue, function prefix, free text (searched in
    the function name and the JSON of the arguments, case-insensitively)."""

    states: tuple[str, ...] = ()
    queue: str | None = None
    func: str | None = None
    text: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        state: str | Iterable[str] | None = None,
        queue: str | None = None,
        func: str | None = None,
        text: str | None = None,
    ) -> JobFilter:
        """Validate raw (query-string) values; empty strings mean "no filter"."""
        raw_states: list[str] = []
        for part in [state] if isinstance(state, str) else list(state or ()):
            raw_states.extend(s for s in str(part).split(",") if s)
        known = {s.value for s in QueuedJob.State}
        for value in raw_states:
            if value not in known:
                raise WebQueryError(f"unknown job state {value[:50]!r}")
        for label, given in (("queue", queue), ("func", func), ("text", text)):
            if given is not None and len(given) > MAX_TEXT:
                raise WebQueryError(f"{label} filter longer than {MAX_TEXT} characters")
        return cls(
            states=tuple(dict.fromkeys(raw_states)),
            queue=queue or None,
            func=func or None,
            text=text or None,
        )

    def is_empty(self) -> bool:
        """True when the filter matches every job."""
        return not (self.states or self.queue or self.func or self.text)


@dataclasses.dataclass(frozen=True, slots=True)
class JobPage:
    """A page of job summaries. ``next_before`` is the cursor of the next (older) page,
    None at the end; ``scanned`` is how many jobs were read to fill this page."""

    jobs: list[Row]
    next_before: str | None
    scanned: int


def parse_cursor(value: str | None) -> uuid.UUID | None:
    """A job id used as keyset cursor, or :class:`WebQueryError`."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise WebQueryError("before must be a job id") from None


def list_jobs(
    store: Store,
    job_filter: JobFilter,
    *,
    limit: int = 50,
    before: uuid.UUID | None = None,
    scan: int = DEFAULT_SCAN,
) -> Op[JobPage]:
    """Jobs matching ``job_filter`` below ``before``, newest first. At most ``scan`` jobs
    are read, so a page of a selective filter may come back short with a cursor to go on."""
    limit = max(1, min(int(limit), MAX_PAGE))
    scan = max(limit, min(int(scan), MAX_SCAN))
    rows = yield (
        store.q("web_select_jobs_page"),
        {
            "before": before or _MAX_UUID,
            "scan": scan,
            "limit": limit,
            "states": list(job_filter.states) or None,
            "queue": job_filter.queue,
            "func": job_filter.func,
            "text": job_filter.text.lower() if job_filter.text else None,
        },
    )
    scanned = int(rows[0]["scanned"]) if rows else 0
    jobs = [
        {k: v for k, v in row.items() if k not in ("scanned", "oldest")}
        for row in rows
        if row["id"] is not None
    ]
    next_before: str | None = None
    if len(jobs) == limit:
        next_before = str(jobs[-1]["id"])
    elif scanned == scan and rows and rows[0]["oldest"] is not None:
        next_before = str(rows[0]["oldest"])
    return JobPage(jobs=jobs, next_before=next_before, scanned=scanned)


def collect_job_ids(
    store: Store,
    job_filter: JobFilter,
    *,
    limit: int = MAX_BULK,
    before: uuid.UUID | None = None,
    max_scanned: int = 5 * MAX_SCAN,
) -> Op[list[uuid.UUID]]:
    """Ids of up to ``limit`` newest jobs matching ``job_filter`` below ``before``, reading
    at most about ``max_scanned`` jobs (for bulk actions)."""
    ids: list[uuid.UUID] = []
    scanned = 0
    cursor = before
    while len(ids) < limit and scanned < max_scanned:
        page = yield from list_jobs(
            store, job_filter, limit=min(limit - len(ids), MAX_PAGE), before=cursor, scan=MAX_SCAN
        )
        ids.extend(row["id"] for row in page.jobs)
        scanned += page.scanned
        if page.next_before is None:
            break
        cursor = uuid.UUID(page.next_before)
    return ids[:limit]


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCounts:
    """Live jobs per state and jobs finished recently per state, for one queue."""

    live: dict[str, int]
    recent: dict[str, int]


def queue_counts(store: Store, *, window: float = 3600) -> Op[dict[str, QueueCounts]]:
    """Counts per queue: live jobs by state, and jobs finished in the last ``window`` s."""
    rows = yield store.q("web_select_queue_counts"), {"window": float(window)}
    counts: dict[str, QueueCounts] = {}
    for row in rows:
        entry = counts.setdefault(row["queue"], QueueCounts({}, {}))
        target = entry.live if row["state"] in ("pending", "retrying", "running") else entry.recent
        target[row["state"]] = int(row["n"])
    return counts


def throughput(
    store: Store, *, window: int = 3600, bucket: int = 60, queue: str | None = None
) -> Op[dict[str, Any]]:
    """Finished jobs per ``bucket`` seconds and state over the last ``window`` seconds,
    with empty buckets filled: ``{"t": [epoch...], "succeeded": [...], ...}``."""
    bucket = max(1, int(bucket))
    window = max(bucket, int(window))
    rows = yield (
        store.q("web_select_throughput"),
        {"window": float(window), "bucket": float(bucket), "queue": queue},
    )
    states = ("succeeded", "failed", "cancelled")
    if rows:
        now = rows[0]["now"]
    else:
        clock = yield store.q("web_select_now"), None
        now = clock[0]["now"]
    end = int(now.timestamp()) // bucket * bucket
    times = list(range(end - window + bucket, end + bucket, bucket))
    index = {t: i for i, t in enumerate(times)}
    series: dict[str, list[int]] = {s: [0] * len(times) for s in states}
    for row in rows:
        position = index.get(int(row["bucket"].timestamp()))
        if position is not None:
            series[row["state"]][position] += int(row["n"])
    return {"t": times, **series}


def list_workers(store: Store) -> Op[list[Row]]:
    """Workers with heartbeat age, liveness, leadership and running-job count."""
    rows = yield store.q("web_select_workers_all"), None
    return rows


def retry_jobs(store: Store, ids: Sequence[uuid.UUID | Reference]) -> Op[list[uuid.UUID]]:
    """Put the finished jobs among ``ids`` back in line; returns those retried."""
    rows = yield store.q("web_retry_jobs_many"), {"ids": [Reference(i).uuid for i in ids]}
    return [r["id"] for r in rows]


def cancel_jobs(
    store: Store, ids: Sequence[uuid.UUID | Reference], *, notify: bool
) -> Op[list[uuid.UUID]]:
    """Cancel the live jobs among ``ids``; returns those cancelled."""
    rows = yield (
        store.q("web_cancel_jobs_many"),
        {"ids": [Reference(i).uuid for i in ids], "notify": notify, "channel": store.channel},
    )
    return [r["id"] for r in rows]


def delete_jobs(store: Store, ids: Sequence[uuid.UUID | Reference]) -> Op[list[uuid.UUID]]:
    """Delete the jobs among ``ids`` that are not running; returns those deleted."""
    rows = yield store.q("web_delete_jobs_many"), {"ids": [Reference(i).uuid for i in ids]}
    return [r["id"] for r in rows]
