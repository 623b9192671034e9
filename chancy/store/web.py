"""Store operations for the dashboard: bounded job listing with keyset pagination,
queue and throughput counts, workers, and bulk job actions.

Each operation is a generator in the style of :class:`chancy.store.Store` methods; run it
with ``chancy._run(op)`` or :func:`chancy.store.arun`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
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
#: Most finished jobs read to count recent outcomes (overview counts, charts).
MAX_COUNTED = 100_000
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
    None at the end; ``scanned`` is how many jobs a short page read (-1 for a full page,
    whose scan stopped as soon as it filled)."""

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
    cursor = before or _MAX_UUID
    rows = yield (
        store.q("web_select_jobs_page"),
        {
            "before": cursor,
            "scan": scan,
            "limit": limit,
            "states": list(job_filter.states) or None,
            "queue": job_filter.queue,
            "func": job_filter.func,
            "text": job_filter.text.lower() if job_filter.text else None,
        },
    )
    if len(rows) == limit:
        # Full page: the scan stopped at the last row; how far it read is not counted.
        return JobPage(jobs=rows, next_before=str(rows[-1]["id"]), scanned=-1)
    window = yield store.q("web_select_jobs_window_end"), {"before": cursor, "scan": scan}
    scanned = int(window[0]["scanned"])
    next_before = str(window[0]["oldest"]) if scanned == scan else None
    return JobPage(jobs=rows, next_before=next_before, scanned=scanned)


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
        scanned += page.scanned if page.scanned >= 0 else len(page.jobs)
        if page.next_before is None:
            break
        cursor = uuid.UUID(page.next_before)
    return ids[:limit]


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCounts:
    """Live jobs per state and jobs finished recently per state, for one queue."""

    live: dict[str, int]
    recent: dict[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Counts:
    """Per-queue counts; ``recent_since`` is set when only the newest ``max_rows``
    finished jobs were counted (they reach back to that time, not the whole window)."""

    queues: dict[str, QueueCounts]
    recent_since: dt.datetime | None


def queue_counts(store: Store, *, window: float = 3600, max_rows: int = MAX_COUNTED) -> Op[Counts]:
    """Counts per queue: live jobs by state, and jobs finished in the last ``window`` s
    (at most ``max_rows`` of them are read)."""
    rows = yield store.q("web_select_queue_counts"), {"window": float(window), "max_rows": max_rows}
    counts: dict[str, QueueCounts] = {}
    recent_total = 0
    earliest: dt.datetime | None = None
    for row in rows:
        entry = counts.setdefault(row["queue"], QueueCounts({}, {}))
        if row["state"] in ("pending", "retrying", "running"):
            entry.live[row["state"]] = int(row["n"])
        else:
            entry.recent[row["state"]] = int(row["n"])
            recent_total += int(row["n"])
            if earliest is None or row["earliest"] < earliest:
                earliest = row["earliest"]
    return Counts(counts, earliest if recent_total >= max_rows else None)


def throughput(
    store: Store,
    *,
    window: int = 3600,
    bucket: int = 60,
    queue: str | None = None,
    max_rows: int = MAX_COUNTED,
) -> Op[dict[str, Any]]:
    """Finished jobs per ``bucket`` seconds and state over the last ``window`` seconds,
    with empty buckets filled: ``{"t": [epoch...], "succeeded": [...], ...,
    "since": epoch or None}``; at most ``max_rows`` jobs are read, the newest, and
    ``since`` then tells from when the counts are complete."""
    bucket = max(1, int(bucket))
    window = max(bucket, int(window))
    rows = yield (
        store.q("web_select_throughput"),
        {"window": float(window), "bucket": float(bucket), "queue": queue, "max_rows": max_rows},
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
    since = None
    if rows and sum(int(r["n"]) for r in rows) >= max_rows:
        since = min(r["earliest"] for r in rows).timestamp()
    return {"t": times, **series, "since": since}


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
