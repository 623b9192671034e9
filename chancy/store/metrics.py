"""Store operations of the Metrics plugin: upsert deltas, read points and live gauges,
prune old buckets. Each is a generator op run with :func:`chancy.store.arun` / ``run``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from chancy.store import Op, Store

#: Resolution name -> bucket width in seconds ('all' is one lifetime bucket).
RESOLUTIONS: dict[str, int | None] = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400, "all": None}

#: Upper bounds (seconds) of the execution-time histogram buckets; a last bucket counts
#: everything slower. Fixed: stored counts are only comparable under the same bounds.
DURATION_BOUNDS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


@dataclasses.dataclass(slots=True)
class Delta:
    """What one worker observed for one metric and label set since its last flush."""

    name: str
    kind: str  # "counter", "histogram" or "gauge"
    queue: str = ""
    func: str = ""
    count: int = 0
    total: float = 0.0
    maximum: float | None = None
    buckets: list[int] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MetricPoint:
    """One metric in one time bucket. ``count`` is the number of events (counters), of
    observations (histograms) or of samples (gauges); ``total`` their sum; ``buckets``
    the histogram counts per :data:`DURATION_BOUNDS` bucket (plus one for slower)."""

    name: str
    kind: str
    resolution: str
    bucket_start: dt.datetime
    queue: str | None
    func: str | None
    count: int
    total: float
    maximum: float | None
    buckets: tuple[int, ...] | None

    @property
    def mean(self) -> float | None:
        """Average observation (histograms) or sample (gauges); None when empty."""
        return self.total / self.count if self.count else None

    @property
    def value(self) -> float:
        """The number to chart: the count of a counter or histogram, a gauge's mean."""
        if self.kind == "gauge":
            return self.mean or 0.0
        return float(self.count)

    def quantile(self, q: float) -> float | None:
        """Estimate the ``q`` quantile (0..1) of a histogram from its buckets (the upper
        bound of the bucket holding it; the maximum for the slowest bucket)."""
        if not self.buckets or not self.count or not 0 <= q <= 1:
            return None
        rank = q * self.count
        seen = 0
        for index, n in enumerate(self.buckets):
            seen += n
            if n and seen >= rank:
                if index < len(DURATION_BOUNDS):
                    bound = DURATION_BOUNDS[index]
                    return min(bound, self.maximum) if self.maximum is not None else bound
                return self.maximum
        return self.maximum

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``bucket_start`` as ISO 8601)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "resolution": self.resolution,
            "bucket_start": self.bucket_start.isoformat(),
            "queue": self.queue,
            "func": self.func,
            "count": self.count,
            "total": self.total,
            "maximum": self.maximum,
            "buckets": list(self.buckets) if self.buckets is not None else None,
            "value": self.value,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class QueueGauges:
    """Live state of one queue: ``depth`` pending + retrying jobs (``due`` of them due
    now), ``oldest_pending_age`` seconds the oldest due job has waited, ``running``."""

    queue: str
    depth: int
    due: int
    oldest_pending_age: float
    running: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return dataclasses.asdict(self)


def upsert_deltas(
    store: Store, deltas: Sequence[Delta], *, lock_timeout: float, statement_timeout: float
) -> Op[int]:
    """Add ``deltas`` to every resolution's current bucket in one statement (run it in a
    transaction so that the timeouts apply); returns how many deltas were written."""
    if not deltas:
        return 0
    yield (
        store.q("metrics_set_local_timeouts"),
        {
            "lock_timeout": f"{int(lock_timeout * 1000)}ms",
            "statement_timeout": f"{int(statement_timeout * 1000)}ms",
        },
    )
    ordered = sorted(deltas, key=lambda d: (d.name, d.queue, d.func))
    yield (
        store.q("metrics_upsert_deltas"),
        {
            "name": [d.name for d in ordered],
            "kind": [d.kind for d in ordered],
            "queue": [d.queue for d in ordered],
            "func": [d.func for d in ordered],
            "count": [d.count for d in ordered],
            "total": [float(d.total) for d in ordered],
            "maximum": [d.maximum for d in ordered],
            "buckets": [
                None if d.buckets is None else "{" + ",".join(map(str, d.buckets)) + "}"
                for d in ordered
            ],
        },
    )
    return len(ordered)


def select_points(
    store: Store,
    *,
    resolution: str,
    since: dt.datetime | dt.timedelta | None = None,
    queue: str | None = None,
    func: str | None = None,
    names: Iterable[str] | None = None,
    limit: int = 100_000,
) -> Op[list[MetricPoint]]:
    """Stored points of ``resolution`` from ``since`` on (a datetime, or a timedelta back
    from the database's clock), oldest first."""
    rows = yield (
        store.q("metrics_select_many"),
        {
            "resolution": resolution,
            "since": since if isinstance(since, dt.datetime) else None,
            "ago": since.total_seconds() if isinstance(since, dt.timedelta) else None,
            "queue": queue,
            "func": func,
            "names": None if names is None else list(names),
            "limit": limit,
        },
    )
    return [
        MetricPoint(
            name=r["name"],
            kind=r["kind"],
            resolution=r["resolution"],
            bucket_start=r["bucket_start"],
            queue=r["queue"],
            func=r["func"],
            count=r["count"],
            total=r["total"],
            maximum=r["maximum"],
            buckets=tuple(r["buckets"]) if r["buckets"] is not None else None,
        )
        for r in rows
    ]


def select_queue_gauges(store: Store) -> Op[list[QueueGauges]]:
    """Live depth, due count, oldest due age and running count of every queue."""
    rows = yield store.q("metrics_select_queue_gauges"), None
    return [
        QueueGauges(
            queue=r["queue"],
            depth=int(r["depth"]),
            due=int(r["due"]),
            oldest_pending_age=float(r["oldest_pending_age"]),
            running=int(r["running"]),
        )
        for r in rows
    ]


def delete_expired(store: Store, leader: str, retention: dict[str, float], limit: int) -> Op[int]:
    """As leaseholder ``leader``, delete at most ``limit`` buckets older than their
    resolution's retention in seconds; returns the count (0 without a live lease)."""
    resolutions = sorted(r for r in retention if r != "all")
    rows = yield (
        store.q("metrics_delete_expired"),
        {
            "resolution": resolutions,
            "keep": [float(retention[r]) for r in resolutions],
            "leader": leader,
            "limit": limit,
        },
    )
    return len(rows)
