"""The Metrics plugin: counters and histograms aggregated across workers in Postgres,
resolutions, flush on shutdown, retention, gauges, Prometheus export, failure tolerance."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql

from chancy import Chancy, Job, Queue, Reference
from chancy.errors import ConfigurationError
from chancy.plugin import Plugin
from chancy.plugins.leadership import Leadership
from chancy.plugins.metrics import (
    DURATION_BOUNDS,
    MetricPoint,
    Metrics,
    register_prometheus,
)
from chancy.store import arun
from chancy.store import metrics as metrics_store
from chancy.store.metrics import Delta
from tests.test_worker import poll, serving

ASYNC = Chancy.Executor.Async
JOB_METRICS = ["jobs.succeeded", "jobs.retried", "jobs.failed", "jobs.duration"]


def plugins(**settings: Any) -> list[Plugin]:
    options: dict[str, Any] = {"flush_interval": 0.1, "gauge_interval": 0.1}
    options.update(settings)
    return [Leadership(poll_interval=0.1, timeout=1), Metrics(**options)]


def metrics_of(app: Chancy) -> Metrics:
    plugin = app.plugins["chancy.metrics"]
    assert isinstance(plugin, Metrics)
    return plugin


async def rows(app: Chancy, where: str = "true") -> list[dict[str, Any]]:
    query = sql.SQL("SELECT * FROM {} WHERE " + where).format(sql.Identifier("chancy_metrics"))
    async with app.pool.connection() as conn:
        cur = psycopg.AsyncClientCursor(conn, row_factory=psycopg.rows.dict_row)
        await cur.execute(query)
        return await cur.fetchall()


def totals(points: list[MetricPoint]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in points:
        out[p.name] = out.get(p.name, 0) + p.count
    return out


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[Chancy]:
    async with Chancy(dsn, plugins=plugins()) as chancy:
        await chancy.migrate()
        await chancy.declare(Queue("q", executor=ASYNC, concurrency=4, polling_interval=0.2))
        yield chancy


async def push(app: Chancy, func: str, n: int, **fields: Any) -> list[Reference]:
    return [await app.push(Job(func=func, queue="q", **fields)) for _ in range(n)]


async def wait_all(app: Chancy, refs: list[Reference]) -> None:
    for ref in refs:
        job = await app.wait_for_job(ref, timeout=30)
        assert job is not None and job.state in (job.State.SUCCEEDED, job.State.FAILED)


def test_default_plugin_and_settings(dsn: str) -> None:
    assert isinstance(Chancy(dsn).plugins["chancy.metrics"], Metrics)
    for bad in (
        {"flush_interval": 0},
        {"gauge_interval": -1},
        {"retention": {"2m": 60}},
        {"retention": {"1m": 0}},
        {"prune_batch_size": 0},
        {"prometheus_port": 70000},
    ):
        with pytest.raises(ConfigurationError):
            Metrics(**bad)


async def test_counters_aggregate_across_workers(dsn: str) -> None:
    # Two apps, each with its own Metrics plugin (as two processes would have), serve the
    # same queue; their counts meet in the same rows.
    async with (
        Chancy(dsn, plugins=plugins()) as one,
        Chancy(dsn, plugins=plugins()) as two,
    ):
        await one.migrate()
        await one.declare(Queue("q", executor=ASYNC, concurrency=1, polling_interval=0.2))
        async with serving(one, worker_id="w1"), serving(two, worker_id="w2"):
            ok = await push(one, "tests.jobs.async_sleep", 40, kwargs={"seconds": 0.02})
            bad = await push(one, "tests.jobs.fail", 5, max_attempts=2)
            await wait_all(one, ok + bad)
        jobs = await one.get_jobs(ok + bad)
        assert {j.taken_by for j in jobs} == {"w1", "w2"}
        for resolution in ("1m", "all"):
            points = await Metrics.get_metrics(
                one, resolution=resolution, queue="q", names=JOB_METRICS
            )
            assert totals(points) == {
                "jobs.succeeded": 40,
                "jobs.retried": 5,
                "jobs.failed": 5,
                "jobs.duration": 50,
            }
        per_func = await Metrics.get_metrics(
            one, resolution="1h", names=["jobs.failed", "jobs.retried"], per="func"
        )
        assert {(p.name, p.func, p.count) for p in per_func} == {
            ("jobs.failed", "tests.jobs.fail", 5),
            ("jobs.retried", "tests.jobs.fail", 5),
        }
        assert all(p.queue is None for p in per_func)


async def test_histogram_buckets(app: Chancy) -> None:
    async with serving(app):
        fast = await push(app, "tests.jobs.noop", 3)
        slow = await push(app, "tests.jobs.async_sleep", 2, kwargs={"seconds": 0.3})
        await wait_all(app, fast + slow)
    [point] = await Metrics.get_metrics(app, resolution="all", names=["jobs.duration"], per="queue")
    assert point.kind == "histogram" and point.buckets is not None
    assert len(point.buckets) == len(DURATION_BOUNDS) + 1
    assert point.count == sum(point.buckets) == 5
    slow_bucket = DURATION_BOUNDS.index(0.5)  # 0.25 < 0.3s + overhead <= 0.5
    assert point.buckets[slow_bucket] == 2
    assert sum(point.buckets[: DURATION_BOUNDS.index(0.25) + 1]) == 3
    assert point.maximum is not None and 0.3 <= point.maximum <= 0.5
    assert 0.6 <= point.total <= 1.5
    assert point.quantile(0.5) is not None and point.quantile(0.5) <= 0.25  # type: ignore[operator]
    assert point.quantile(1.0) == point.maximum
    assert point.to_dict()["buckets"] == list(point.buckets)


async def test_resolutions_roll_up_and_deltas_add(app: Chancy) -> None:
    store = app.store
    buckets = [0] * (len(DURATION_BOUNDS) + 1)
    buckets[0], buckets[-1] = 2, 1
    first = [
        Delta("jobs.succeeded", "counter", "q", "f", count=3),
        Delta("jobs.duration", "histogram", "q", "f", 3, 4000.5, 4000.0, list(buckets)),
    ]
    second = [
        Delta("jobs.succeeded", "counter", "q", "f", count=4),
        Delta("jobs.duration", "histogram", "q", "f", 1, 0.2, 0.2, [0] * 5 + [1] + [0] * 11),
    ]
    async with app.pool.connection() as conn, conn.transaction():
        # One transaction: both upserts see the same now(), so they meet in one bucket.
        for deltas in (first, second):
            op = metrics_store.upsert_deltas(store, deltas, lock_timeout=1, statement_timeout=5)
            await arun(conn, op)
        cur = await conn.execute("SELECT now()")
        now = (await cur.fetchone())[0]  # type: ignore[index]
    widths = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
    for resolution in ("1m", "5m", "1h", "1d", "all"):
        points = await Metrics.get_metrics(app, resolution=resolution)
        by_name = {p.name: p for p in points}
        assert by_name["jobs.succeeded"].count == 7
        hist = by_name["jobs.duration"]
        assert hist.count == 4 and hist.maximum == 4000.0
        assert hist.buckets is not None and hist.buckets[0] == 2 and hist.buckets[-1] == 1
        assert hist.buckets[5] == 1 and sum(hist.buckets) == 4
        start = hist.bucket_start
        if resolution == "all":
            assert start == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        else:
            epoch = start.timestamp()
            assert epoch % widths[resolution] == 0
            assert start <= now < start + dt.timedelta(seconds=widths[resolution])
    # Points of other resolutions stay separate rows: one per resolution per key.
    assert len(await rows(app)) == 2 * 5


async def test_flush_on_shutdown_and_one_statement_per_flush(app: Chancy) -> None:
    metrics = Metrics(flush_interval=3600, gauge_interval=3600)
    app.plugins["chancy.metrics"] = metrics
    written: list[int] = []
    async with serving(app) as worker:
        worker.hub.on("metrics.flushed", lambda _name, n: written.append(n))
        refs = await push(app, "tests.jobs.noop", 50)
        await wait_all(app, refs)
        await poll(lambda: metrics.pending_count() == 50)
        assert await rows(app, "name = 'jobs.succeeded'") == []
    # Nothing was lost at shutdown, and 50 jobs cost one upsert of two deltas.
    assert metrics.flushes == 1 and written == [2]
    [point] = await Metrics.get_metrics(app, names=["jobs.succeeded"])
    assert point.count == 50 and metrics.pending_count() == 0
    assert len(await rows(app, "name LIKE 'jobs.%'")) == 2 * 5


async def test_periodic_flush_batches_jobs(app: Chancy) -> None:
    metrics = metrics_of(app)

    async def succeeded() -> int:
        points = await Metrics.get_metrics(app, names=["jobs.succeeded"])
        return totals(points).get("jobs.succeeded", 0)

    async with serving(app):
        refs = await push(app, "tests.jobs.noop", 30)
        await wait_all(app, refs)
        # Written by the periodic flush while the worker still runs.
        await poll(lambda: _equals(succeeded(), 30))
    assert 1 <= metrics.flushes < 30


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_retention_prunes_in_batches_as_leader_only(app: Chancy) -> None:
    metrics = Metrics(retention={"1m": 3600, "5m": 7200}, prune_batch_size=2)
    app.plugins["chancy.metrics"] = metrics
    async with app.pool.connection() as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (name, resolution, bucket_start, queue, kind, count) "
                "SELECT 'jobs.succeeded', r, now() - make_interval(hours => h), 'q', "
                "'counter', 1 FROM unnest(ARRAY['1m', '5m', 'all']) AS r, "
                "generate_series(0, 4) AS h"
            ).format(sql.Identifier("chancy_metrics"))
        )
    not_leader = metrics_store.delete_expired(app.store, "nobody", metrics.retention, 100)
    async with app.pool.connection() as conn:
        assert await arun(conn, not_leader) == 0
    async with serving(app) as worker:
        await poll(lambda: worker.is_leader.is_set())
        await poll(lambda: rows_left(app, 8))
    left = await rows(app, "name = 'jobs.succeeded'")
    ages = sorted((r["resolution"], r["bucket_start"]) for r in left)
    assert [r for r, _ in ages].count("all") == 5  # lifetime totals are never pruned
    assert [r for r, _ in ages].count("1m") == 1  # only the bucket of the last hour
    assert [r for r, _ in ages].count("5m") == 2


async def rows_left(app: Chancy, n: int) -> bool:
    return len(await rows(app, "name = 'jobs.succeeded'")) == n


async def test_queue_gauges_live_and_sampled(app: Chancy) -> None:
    await app.declare(Queue("idle", executor=ASYNC))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await push(app, "tests.jobs.noop", 3)
    await push(app, "tests.jobs.noop", 2, scheduled_at=later)
    gauges = {g.queue: g for g in await Metrics.get_queue_gauges(app)}
    assert set(gauges) == {"q", "idle"}
    assert (gauges["q"].depth, gauges["q"].due, gauges["q"].running) == (5, 3, 0)
    assert gauges["q"].oldest_pending_age >= 0
    assert gauges["idle"].to_dict() == {
        "queue": "idle",
        "depth": 0,
        "due": 0,
        "oldest_pending_age": 0.0,
        "running": 0,
    }
    # The leader samples them into the metrics table (the worker does not serve "q").
    async with serving(app, queues=["idle"]) as worker:
        await poll(lambda: worker.is_leader.is_set())
        await worker.hub.wait_for("metrics.sampled", timeout=10)
        await worker.hub.wait_for("metrics.sampled", timeout=10)
    points = await Metrics.get_metrics(
        app, resolution="all", names=["queue.depth", "queue.due"], queue="q"
    )
    assert {p.name: p.value for p in points} == {"queue.depth": 5.0, "queue.due": 3.0}
    assert all(p.kind == "gauge" and p.count >= 2 for p in points)
    merged = await Metrics.get_metrics(app, resolution="all", names=["queue.depth"], per="none")
    assert [p.value for p in merged] == [5.0]  # sum over queues of each queue's mean


async def test_running_gauge(app: Chancy) -> None:
    async with serving(app) as worker:
        refs = await push(app, "tests.jobs.async_sleep", 2, kwargs={"seconds": 30})
        await poll(lambda: len(worker.executors["q"].running) == 2)
        [gauge] = await Metrics.get_queue_gauges(app)
        assert (gauge.queue, gauge.depth, gauge.running) == ("q", 0, 2)
        for ref in refs:
            await app.cancel_job(ref)
    points = await Metrics.get_metrics(app, names=["jobs.cancelled"])
    assert totals(points) == {"jobs.cancelled": 2}


async def test_prometheus_exposition(app: Chancy) -> None:
    async with serving(app):
        refs = await push(app, "tests.jobs.noop", 4)
        await wait_all(app, refs)
    await push(app, "tests.jobs.noop", 2)
    registry = CollectorRegistry()
    register_prometheus(app, registry)
    text = (await asyncio.to_thread(generate_latest, registry)).decode()
    assert "chancy_metrics_up 1.0" in text
    assert 'chancy_queue_depth{queue="q"} 2.0' in text
    assert 'chancy_queue_running{queue="q"} 0.0' in text
    assert 'chancy_jobs_total{func="tests.jobs.noop",outcome="succeeded",queue="q"} 4.0' in text
    assert (
        'chancy_job_duration_seconds_bucket{func="tests.jobs.noop",le="+Inf",queue="q"} 4.0' in text
    )
    assert 'chancy_job_duration_seconds_count{func="tests.jobs.noop",queue="q"} 4.0' in text


async def test_prometheus_scrape_without_database_reports_down(dsn: str) -> None:
    app = Chancy("host=127.0.0.1 port=1 connect_timeout=1")
    registry = CollectorRegistry()
    register_prometheus(app, registry)
    text = (await asyncio.to_thread(generate_latest, registry)).decode()
    assert "chancy_metrics_up 0.0" in text
    assert "chancy_queue_depth" not in text


async def test_prometheus_served_by_worker(dsn: str) -> None:
    async with Chancy(dsn, plugins=plugins(prometheus_port=0)) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=ASYNC))
        metrics = metrics_of(app)
        async with serving(app):
            await poll(lambda: metrics.prometheus_address is not None)
            address = metrics.prometheus_address
            assert address is not None
            url = f"http://{address[0]}:{address[1]}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
            assert b'chancy_queue_depth{queue="q"} 0.0' in body
        assert metrics.prometheus_address is None  # stopped with the last worker


async def test_locked_metrics_table_does_not_stop_jobs(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Chancy(dsn, plugins=plugins(lock_timeout=0.1)) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=ASYNC, concurrency=4, polling_interval=0.2))
        metrics = metrics_of(app)
        blocker = await psycopg.AsyncConnection.connect(dsn)
        try:
            await blocker.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier("chancy_metrics")
                )
            )
            with caplog.at_level(logging.WARNING, logger="chancy"):
                async with serving(app):
                    refs = await push(app, "tests.jobs.noop", 20)
                    await wait_all(app, refs)  # jobs complete while flushes fail
                    await poll(lambda: "metrics flush failed" in caplog.text)
                    # Kept for the next flush (read between two failing flushes).
                    await poll(lambda: metrics.pending_count() == 20)
                    await blocker.rollback()
                    await poll(lambda: metrics.pending_count() == 0)
        finally:
            await blocker.close()
        points = await Metrics.get_metrics(app, names=["jobs.succeeded"])
        assert totals(points) == {"jobs.succeeded": 20}


async def test_missing_metrics_table_is_survivable(app: Chancy) -> None:
    metrics = metrics_of(app)
    table = sql.Identifier("chancy_metrics")
    async with app.pool.connection() as conn:
        await conn.execute(sql.SQL("ALTER TABLE {} RENAME TO chancy_metrics_away").format(table))
    async with serving(app):
        refs = await push(app, "tests.jobs.noop", 5)
        await wait_all(app, refs)
        await poll(lambda: metrics.pending_count() == 5)
        async with app.pool.connection() as conn:
            await conn.execute(
                sql.SQL("ALTER TABLE chancy_metrics_away RENAME TO {}").format(table)
            )
        await poll(lambda: metrics.pending_count() == 0)
    points = await Metrics.get_metrics(app, names=["jobs.succeeded"])
    assert totals(points) == {"jobs.succeeded": 5}


async def test_read_api_validates_early(app: Chancy) -> None:
    with pytest.raises(ConfigurationError):
        await Metrics.get_metrics(app, resolution="2m")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await Metrics.get_metrics(app, since=dt.datetime(2020, 1, 1))
    with pytest.raises(ConfigurationError):
        await Metrics.get_metrics(app, per="queues")  # type: ignore[arg-type]
    assert await Metrics.get_metrics(app, since=dt.timedelta(minutes=5)) == []


async def test_migration_down_and_up(app: Chancy) -> None:
    async def has_table() -> bool:
        async with app.pool.connection() as conn:
            cur = await conn.execute("SELECT to_regclass('chancy_metrics') IS NOT NULL")
            row = await cur.fetchone()
            return bool(row and row[0])

    metrics = metrics_of(app)
    package = metrics.migrations_package()
    async with app.pool.connection() as conn, conn.transaction():
        await arun(conn, app.store.migrate(metrics.get_identifier(), package, 0))
    assert not await has_table() and not await app.is_up_to_date()
    await app.migrate()
    assert await has_table() and await app.is_up_to_date()


async def test_busy_prometheus_port_does_not_stop_counting(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with Chancy(dsn, plugins=plugins(prometheus_port=port)) as app:
            await app.migrate()
            await app.declare(Queue("q", executor=ASYNC))
            with caplog.at_level(logging.ERROR, logger="chancy"):
                async with serving(app):
                    refs = await push(app, "tests.jobs.noop", 3)
                    await wait_all(app, refs)
            assert "cannot serve Prometheus" in caplog.text
            assert metrics_of(app).prometheus_address is None
            points = await Metrics.get_metrics(app, names=["jobs.succeeded"])
            assert totals(points) == {"jobs.succeeded": 3}
