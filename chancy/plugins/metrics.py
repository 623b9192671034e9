"""Metrics: job counters and execution-time histograms aggregated across workers in
Postgres at 1-minute, 5-minute, 1-hour and 1-day resolutions, plus queue gauges sampled by
the leader, a read API for the dashboard and optional Prometheus export."""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from chancy import store as store_module
from chancy.errors import ConfigurationError
from chancy.plugin import Plugin
from chancy.store import metrics as metrics_store
from chancy.store.metrics import DURATION_BOUNDS, RESOLUTIONS, Delta, MetricPoint, QueueGauges

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.job import QueuedJob
    from chancy.store import Outcome
    from chancy.worker import Worker

__all__ = [
    "DURATION_BOUNDS",
    "MetricPoint",
    "Metrics",
    "PrometheusCollector",
    "QueueGauges",
    "register_prometheus",
]

log = logging.getLogger("chancy.metrics")

#: Counter name per outcome state. ``jobs.requeued``: handed back without using an
#: attempt (snoozed, or interrupted by a shutdown).
COUNTER_OF_STATE = {
    "succeeded": "jobs.succeeded",
    "failed": "jobs.failed",
    "retrying": "jobs.retried",
    "cancelled": "jobs.cancelled",
    "pending": "jobs.requeued",
}
DURATION = "jobs.duration"
GAUGES = ("queue.depth", "queue.due", "queue.oldest_pending_age", "queue.running")
DEFAULT_RETENTION: dict[str, float] = {
    "1m": 6 * 3600,
    "5m": 3 * 86400,
    "1h": 30 * 86400,
    "1d": 730 * 86400,
}
#: The resolutions :meth:`Metrics.get_metrics` accepts ('all': lifetime totals).
Resolution = Literal["1m", "5m", "1h", "1d", "all"]


class _Accumulator:
    """In-memory deltas since the last flush, keyed by (metric, queue, func). Its size is
    bounded by the number of distinct metrics, queues and functions, not by job count."""

    def __init__(self) -> None:
        self.deltas: dict[tuple[str, str, str], Delta] = {}

    def count(self, name: str, queue: str, func: str) -> None:
        key = (name, queue, func)
        delta = self.deltas.get(key)
        if delta is None:
            delta = self.deltas[key] = Delta(name, "counter", queue, func)
        delta.count += 1

    def observe(self, name: str, kind: str, queue: str, func: str, value: float) -> None:
        key = (name, queue, func)
        delta = self.deltas.get(key)
        if delta is None:
            buckets = [0] * (len(DURATION_BOUNDS) + 1) if kind == "histogram" else None
            delta = self.deltas[key] = Delta(name, kind, queue, func, buckets=buckets)
        delta.count += 1
        delta.total += value
        if delta.maximum is None or value > delta.maximum:
            delta.maximum = value
        if delta.buckets is not None:
            delta.buckets[bisect.bisect_left(DURATION_BOUNDS, value)] += 1

    def take(self) -> list[Delta]:
        deltas, self.deltas = list(self.deltas.values()), {}
        return deltas

    def put_back(self, deltas: Iterable[Delta]) -> None:
        """Merge deltas a failed flush could not write back into the current ones."""
        for old in deltas:
            key = (old.name, old.queue, old.func)
            new = self.deltas.get(key)
            if new is None:
                self.deltas[key] = old
                continue
            new.count += old.count
            new.total += old.total
            if old.maximum is not None and (new.maximum is None or old.maximum > new.maximum):
                new.maximum = old.maximum
            if new.buckets is not None and old.buckets is not None:
                new.buckets = [a + b for a, b in zip(new.buckets, old.buckets, strict=True)]


class Metrics(Plugin):
    """Counts job outcomes (``jobs.succeeded``, ``jobs.failed``, ``jobs.retried``,
    ``jobs.cancelled``, ``jobs.requeued``) and execution times (``jobs.duration``, a
    histogram over :data:`DURATION_BOUNDS`) per queue and function.

    Counting is a dict increment per job; every ``flush_interval`` seconds (and when the
    worker stops) the deltas are added to the ``metrics`` table in one statement, binned by
    the database clock. A failed flush keeps its deltas for the next one. The leader
    samples queue gauges every ``gauge_interval`` seconds and deletes buckets older than
    ``retention`` (seconds per resolution) every ``retention_interval`` seconds in batches
    of ``prune_batch_size``. With ``prometheus_port`` every worker serves the Prometheus
    exposition (see :func:`register_prometheus`) on ``prometheus_addr``.
    """

    def __init__(
        self,
        *,
        flush_interval: float = 5,
        gauge_interval: float = 10,
        retention: dict[str, float] | None = None,
        retention_interval: float = 60,
        prune_batch_size: int = 5000,
        lock_timeout: float = 2,
        statement_timeout: float = 10,
        prometheus_port: int | None = None,
        prometheus_addr: str = "127.0.0.1",
    ) -> None:
        for label, value in (
            ("flush_interval", flush_interval),
            ("gauge_interval", gauge_interval),
            ("retention_interval", retention_interval),
            ("lock_timeout", lock_timeout),
            ("statement_timeout", statement_timeout),
        ):
            if not value > 0:
                raise ConfigurationError(f"Metrics needs {label} > 0")
        if prune_batch_size < 1:
            raise ConfigurationError("Metrics needs prune_batch_size >= 1")
        merged = {**DEFAULT_RETENTION, **(retention or {})}
        unknown = set(merged) - set(DEFAULT_RETENTION)
        if unknown:
            raise ConfigurationError(
                f"Metrics retention: unknown resolution(s) {sorted(unknown)}; "
                f"use {sorted(DEFAULT_RETENTION)}"
            )
        if any(not seconds > 0 for seconds in merged.values()):
            raise ConfigurationError("Metrics retention must be positive seconds")
        if prometheus_port is not None and not 0 <= prometheus_port <= 65535:
            raise ConfigurationError(f"invalid prometheus_port {prometheus_port}")
        self.flush_interval = flush_interval
        self.gauge_interval = gauge_interval
        self.retention = merged
        self.retention_interval = retention_interval
        self.prune_batch_size = prune_batch_size
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.prometheus_port = prometheus_port
        self.prometheus_addr = prometheus_addr
        self._pending = _Accumulator()
        self._started: dict[tuple[uuid.UUID, int], float] = {}
        self._flush_lock = asyncio.Lock()
        self._workers: set[str] = set()
        self._prometheus_server: Any = None
        #: Flushes that wrote something (tests and the docs read it).
        self.flushes = 0

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.metrics"

    def migrations_package(self) -> str:
        return "chancy.migrations.metrics"

    # -- recording --------------------------------------------------------------------

    def _on_started(self, event: str, job: QueuedJob) -> None:
        # A hub handler, like _on_completed: no coroutine per job.
        self._started[(job.id.uuid, job.attempts)] = time.monotonic()

    def _on_completed(self, event: str, outcome: Outcome) -> None:
        # A hub handler rather than on_job_completed: the worker calls it synchronously
        # with the final outcome, so counting costs no task or await per job.
        job = outcome.job
        queue, func = job.queue, job.func
        self._pending.count(COUNTER_OF_STATE.get(outcome.state, "jobs.other"), queue, func)
        started = self._started.pop((job.id.uuid, job.attempts), None)
        if started is not None:
            self._pending.observe(DURATION, "histogram", queue, func, time.monotonic() - started)

    def pending_count(self) -> int:
        """Events counted in memory and not yet taken by a flush (all workers of this
        process that share this plugin)."""
        return sum(d.count for d in self._pending.deltas.values() if d.kind == "counter")

    # -- the service ------------------------------------------------------------------

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        worker.hub.remove("job.started", self._on_started)
        worker.hub.on("job.started", self._on_started)
        worker.hub.remove("job.completed", self._on_completed)
        worker.hub.on("job.completed", self._on_completed)
        self._workers.add(worker.worker_id)
        if self.prometheus_port is not None and self._prometheus_server is None:
            try:
                self._start_prometheus(chancy)
            except (ImportError, OSError) as exc:
                # Counting must go on without the exporter; one error, not a restart loop.
                self._prometheus_server = exc
                worker.log.error("metrics: cannot serve Prometheus: %s", exc)
        await asyncio.gather(self._flush_loop(worker), self._leader_loop(worker, chancy))

    async def _flush_loop(self, worker: Worker) -> None:
        failures = 0
        while not worker.stopping.is_set():
            delay = self.flush_interval * min(2**failures, 8)
            await self.sleep(worker, delay)
            if worker.stopping.is_set():
                return  # cleanup writes what is left
            try:
                # Shielded: a write cancelled at shutdown could commit and then be
                # counted again by the final flush; cleanup waits for it instead.
                flush = asyncio.ensure_future(self.flush(worker))
                flush.add_done_callback(_retrieve)
                await asyncio.shield(flush)
                failures = 0
            except Exception as exc:
                failures += 1
                worker.log.warning("metrics flush failed (%s); keeping the counts", exc)

    async def flush(self, worker: Worker) -> int:
        """Write the deltas counted so far in one statement now; returns how many deltas
        (metric and label sets) it wrote. On failure the deltas are kept and it raises."""
        async with self._flush_lock:
            deltas = self._pending.take()
            if not deltas:
                return 0
            op = metrics_store.upsert_deltas(
                worker.chancy.store,
                deltas,
                lock_timeout=self.lock_timeout,
                statement_timeout=self.statement_timeout,
            )
            try:
                async with worker.pool.connection() as conn, conn.transaction():
                    written = await store_module.arun(conn, op)
            except BaseException:
                self._pending.put_back(deltas)
                raise
            self.flushes += 1
            worker.hub.emit("metrics.flushed", written)
            return written

    async def _leader_loop(self, worker: Worker, chancy: Chancy) -> None:
        pruned_at = 0.0
        while not worker.stopping.is_set():
            await self.wait_for_leader(worker)
            try:
                await self.sample_gauges(worker)
                if time.monotonic() - pruned_at >= self.retention_interval:
                    await self.prune(worker)
                    pruned_at = time.monotonic()
            except Exception as exc:
                worker.log.warning("metrics leader work failed: %s", exc)
            await self.sleep(worker, self.gauge_interval)

    async def sample_gauges(self, worker: Worker) -> list[QueueGauges]:
        """Read every queue's live gauges and add them as samples to the current buckets."""
        store = worker.chancy.store
        gauges = await worker.run_op(metrics_store.select_queue_gauges(store))
        deltas = [
            Delta(name, "gauge", g.queue, "", 1, float(value), float(value))
            for g in gauges
            for name, value in zip(
                GAUGES, (g.depth, g.due, g.oldest_pending_age, g.running), strict=True
            )
        ]
        op = metrics_store.upsert_deltas(
            store, deltas, lock_timeout=self.lock_timeout, statement_timeout=self.statement_timeout
        )
        async with worker.pool.connection() as conn, conn.transaction():
            await store_module.arun(conn, op)
        worker.hub.emit("metrics.sampled", gauges)
        return gauges

    async def prune(self, worker: Worker) -> int:
        """As leader, delete expired buckets in batches; returns how many were deleted."""
        total = 0
        while worker.is_leader.is_set():
            deleted = await worker.run_op(
                metrics_store.delete_expired(
                    worker.chancy.store, worker.worker_id, self.retention, self.prune_batch_size
                )
            )
            total += deleted
            if deleted < self.prune_batch_size:
                break
        if total:
            worker.hub.emit("metrics.pruned", total)
        return total

    async def cleanup(self, worker: Worker) -> None:
        worker.hub.remove("job.completed", self._on_completed)
        for attempt in range(3):
            try:
                await self.flush(worker)
                break
            except Exception as exc:
                worker.log.warning("metrics: final flush failed (%s)", exc)
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            worker.log.error("metrics: %d counted event(s) not written", self.pending_count())
        self._workers.discard(worker.worker_id)
        if not self._workers:
            self._started.clear()
            self._stop_prometheus()

    # -- reading ----------------------------------------------------------------------

    @staticmethod
    async def get_metrics(
        chancy: Chancy,
        *,
        resolution: Resolution = "1m",
        since: dt.datetime | dt.timedelta | None = None,
        queue: str | None = None,
        func: str | None = None,
        names: Iterable[str] | None = None,
        per: Literal["queue", "func", "both", "none"] = "both",
    ) -> list[MetricPoint]:
        """Stored points of ``resolution`` ("1m", "5m", "1h", "1d", or "all" for lifetime
        totals), oldest first. ``since`` is a datetime or a timedelta back from now;
        ``queue``/``func``/``names`` filter. ``per`` merges label sets: "both" keeps a
        point per queue and function, "queue" sums functions, "func" sums queues, "none"
        sums both (a gauge's merged mean is the sum of the queues' means)."""
        query = _metrics_query(chancy.store, resolution, since, queue, func, names)
        points = await chancy._run(query)
        return merge_points(points, per)

    @staticmethod
    def sync_get_metrics(
        chancy: Chancy,
        *,
        resolution: Resolution = "1m",
        since: dt.datetime | dt.timedelta | None = None,
        queue: str | None = None,
        func: str | None = None,
        names: Iterable[str] | None = None,
        per: Literal["queue", "func", "both", "none"] = "both",
    ) -> list[MetricPoint]:
        """Sync twin of :meth:`get_metrics` (needs ``with chancy:``)."""
        query = _metrics_query(chancy.store, resolution, since, queue, func, names)
        return merge_points(chancy._sync_run(query), per)

    @staticmethod
    async def get_queue_gauges(chancy: Chancy) -> list[QueueGauges]:
        """Live depth, due count, age of the oldest due job and running count per queue."""
        return await chancy._run(metrics_store.select_queue_gauges(chancy.store))

    # -- Prometheus -------------------------------------------------------------------

    def _start_prometheus(self, chancy: Chancy) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        register_prometheus(chancy, registry)
        assert self.prometheus_port is not None
        server = start_http_server(self.prometheus_port, self.prometheus_addr, registry)
        self._prometheus_server = server[0] if isinstance(server, tuple) else True

    def _stop_prometheus(self) -> None:
        server, self._prometheus_server = self._prometheus_server, None
        if server is not None and hasattr(server, "shutdown"):
            server.shutdown()
            server.server_close()

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """(host, port) the Prometheus endpoint listens on, once a worker started it."""
        server = self._prometheus_server
        if not hasattr(server, "server_address"):
            return None
        host, port = server.server_address[:2]
        return str(host), int(port)


def _metrics_query(
    store: store_module.Store,
    resolution: str,
    since: dt.datetime | dt.timedelta | None,
    queue: str | None,
    func: str | None,
    names: Iterable[str] | None,
) -> store_module.Op[list[MetricPoint]]:
    if resolution not in RESOLUTIONS:
        raise ConfigurationError(
            f"unknown metrics resolution {resolution!r}; use one of {sorted(RESOLUTIONS)}"
        )
    if isinstance(since, dt.datetime) and since.tzinfo is None:
        raise ConfigurationError("since must be timezone-aware")
    name_list = None if names is None else [names] if isinstance(names, str) else list(names)
    return metrics_store.select_points(
        store, resolution=resolution, since=since, queue=queue, func=func, names=name_list
    )


def merge_points(
    points: Iterable[MetricPoint], per: Literal["queue", "func", "both", "none"] = "both"
) -> list[MetricPoint]:
    """Sum points that share a name and bucket once the dropped labels are ignored."""
    if per == "both":
        return list(points)
    if per not in ("queue", "func", "none"):
        raise ConfigurationError(f"per must be 'queue', 'func', 'both' or 'none', not {per!r}")
    keep_queue = per == "queue"
    keep_func = per == "func"
    merged: dict[tuple[Any, ...], MetricPoint] = {}
    for p in points:
        queue = p.queue if keep_queue else None
        func = p.func if keep_func else None
        key = (p.bucket_start, p.name, queue, func)
        if p.kind == "gauge":
            # Gauges of different queues add up as their means, one sample each.
            mean = p.mean or 0.0
            p = MetricPoint(
                p.name,
                p.kind,
                p.resolution,
                p.bucket_start,
                queue,
                func,
                1,
                mean,
                p.maximum,
                None,
            )
        old = merged.get(key)
        if old is None:
            merged[key] = MetricPoint(
                p.name,
                p.kind,
                p.resolution,
                p.bucket_start,
                queue,
                func,
                p.count,
                p.total,
                p.maximum,
                p.buckets,
            )
            continue
        if p.kind == "gauge":
            count = 1
            maximum = _add(old.maximum, p.maximum)
        else:
            count = old.count + p.count
            maximum = _max(old.maximum, p.maximum)
        buckets = old.buckets
        if old.buckets is not None and p.buckets is not None:
            buckets = tuple(a + b for a, b in zip(old.buckets, p.buckets, strict=True))
        merged[key] = MetricPoint(
            p.name,
            p.kind,
            p.resolution,
            p.bucket_start,
            queue,
            func,
            count,
            old.total + p.total,
            maximum,
            buckets,
        )
    return sorted(
        merged.values(), key=lambda m: (m.bucket_start, m.name, m.queue or "", m.func or "")
    )


def _retrieve(task: asyncio.Future[Any]) -> None:
    # The flush loop reports failures itself; a shielded flush that fails after the loop
    # was cancelled is reported by the final flush in cleanup.
    if not task.cancelled():
        task.exception()


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


# -- Prometheus ---------------------------------------------------------------------------


def register_prometheus(chancy: Chancy, registry: Any = None) -> Any:
    """Register a collector that reads Chancy's metrics from Postgres at every scrape:
    ``chancy_queue_depth``, ``chancy_queue_due``, ``chancy_queue_running`` and
    ``chancy_queue_oldest_pending_age_seconds`` per queue, ``chancy_jobs_total`` per queue,
    function and outcome, and the ``chancy_job_duration_seconds`` histogram, all summed
    over every worker. Needs ``pip install chancy[metrics]``; ``registry`` defaults to
    prometheus_client's global one. Returns the collector."""
    from prometheus_client import REGISTRY

    collector = PrometheusCollector(chancy)
    (REGISTRY if registry is None else registry).register(collector)
    return collector


class PrometheusCollector:
    """A prometheus_client collector over the metrics table and the live queue gauges;
    each scrape opens one short connection."""

    def __init__(self, chancy: Chancy, *, connect_timeout: int = 5) -> None:
        self.chancy = chancy
        self.connect_timeout = connect_timeout

    def describe(self) -> list[Any]:
        """Nothing up front, so registering does not query the database."""
        return []

    def collect(self) -> Iterator[Any]:
        """Read the database and yield the metric families."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        up = GaugeMetricFamily("chancy_metrics_up", "1 if the last scrape read the database")
        store = self.chancy.store
        try:
            with psycopg.connect(
                self.chancy.dsn, autocommit=True, connect_timeout=self.connect_timeout
            ) as conn:
                gauges = store_module.run(conn, metrics_store.select_queue_gauges(store))
                names = [*COUNTER_OF_STATE.values(), DURATION]
                totals = store_module.run(
                    conn, metrics_store.select_points(store, resolution="all", names=names)
                )
        except psycopg.Error as exc:
            log.warning("prometheus scrape could not read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {
            "depth": GaugeMetricFamily(
                "chancy_queue_depth", "Pending and retrying jobs", labels=["queue"]
            ),
            "due": GaugeMetricFamily(
                "chancy_queue_due", "Pending and retrying jobs due now", labels=["queue"]
            ),
            "running": GaugeMetricFamily("chancy_queue_running", "Running jobs", labels=["queue"]),
            "oldest_pending_age": GaugeMetricFamily(
                "chancy_queue_oldest_pending_age_seconds",
                "How long the oldest due job has waited",
                labels=["queue"],
            ),
        }
        for g in gauges:
            for field, family in families.items():
                family.add_metric([g.queue], float(getattr(g, field)))
        yield from families.values()
        jobs = CounterMetricFamily(
            "chancy_jobs", "Jobs finished, by outcome", labels=["queue", "func", "outcome"]
        )
        durations = HistogramMetricFamily(
            "chancy_job_duration_seconds", "Job execution time", labels=["queue", "func"]
        )
        for point in totals:
            labels = [point.queue or "", point.func or ""]
            if point.kind == "counter":
                jobs.add_metric([*labels, point.name.removeprefix("jobs.")], point.count)
            elif point.buckets is not None:
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, n in zip(DURATION_BOUNDS, point.buckets, strict=False):
                    cumulative += n
                    buckets.append((repr(float(bound)), cumulative))
                buckets.append(("+Inf", point.count))
                durations.add_metric(labels, buckets, point.total)
        yield jobs
        yield durations
