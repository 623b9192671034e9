"""The Cron plugin: schedule validation, persistence, enqueueing once per tick, catch-up
and time zones."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from chancy import Chancy, Job, Queue, Worker
from chancy.errors import ConfigurationError, CronValidationError, UnknownQueueError
from chancy.plugins.cron import (
    MAX_CATCH_UP,
    Cron,
    CronPass,
    due_ticks,
    next_tick,
    resolve_timezone,
)
from chancy.plugins.leadership import Leadership
from chancy.store import arun
from tests.test_worker import db_now, poll, serving

UTC = dt.UTC
NEW_YORK = ZoneInfo("America/New_York")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def job(key: str | None = "k", queue: str = "q", **fields: Any) -> Job:
    return Job(func="tests.jobs.noop", queue=queue, unique_key=key, **fields)


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[Chancy]:
    """A migrated Chancy with the Cron plugin and a declared queue ``q``."""
    async with Chancy(dsn, plugins=[Cron(poll_interval=0.05)]) as chancy:
        await chancy.migrate()
        await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
        yield chancy


async def run_pass(app: Chancy, leader: str = "leader") -> CronPass:
    """One enqueue pass in its own transaction, as ``leader`` (which takes the lease)."""
    plugin = app.plugins["chancy.cron"]
    assert isinstance(plugin, Cron)
    async with app.pool.connection() as conn:
        assert await arun(conn, app.store.acquire_lease(leader, 30))
        async with conn.transaction():
            return await arun(conn, plugin.enqueue_due_op(app, leader))


async def make_due(app: Chancy, minutes: int = 0, key: str | None = None) -> None:
    """Move next_run back to the start of the minute ``minutes`` before the current one
    (a tick of every minutely schedule), as if no worker had run since."""
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_cron SET next_run = date_trunc('minute', now())"
            " - make_interval(mins => %s) WHERE %s::text IS NULL OR unique_key = %s",
            (minutes, key, key),
        )


async def cron_jobs(app: Chancy) -> list[dict[str, Any]]:
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, unique_key, meta, state FROM chancy_jobs ORDER BY meta->>'cron_tick', id"
        )
        columns = [c.name for c in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in await cur.fetchall()]


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("not a cron", job()), {}, "invalid cron expression"),
        (("61 * * * *", job()), {}, "invalid cron expression"),
        (("", job()), {}, "invalid cron expression"),
        ((None, job()), {}, "invalid cron expression"),
        (("0 0 30 2 *", job()), {}, "invalid cron expression"),
        (("* * */20 * 1L", job()), {}, "never fires"),
        (("* * * * *", job()), {"timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        (("* * * * *", job()), {"timezone": "../../etc/passwd"}, "unknown time zone"),
        (("* * * * *", job()), {"timezone": 5}, "IANA name"),
        (("* * * * *", job(None)), {}, "needs a unique_key"),
        (("* * * * *", job("a"), job("a")), {}, "given twice"),
        (("* * * * *",), {}, "at least one job"),
        (("* * * * *", "tests.jobs.noop"), {}, "Job instances"),
        (("* * * * *", job()), {"catch_up": -1}, "catch_up"),
        (("* * * * *", job()), {"catch_up": MAX_CATCH_UP + 1}, "catch_up"),
        (("* * * * *", job()), {"catch_up": 1.5}, "catch_up"),
        (("* * * * *", job("x" * 1001)), {"catch_up": True}, "1000 characters"),
        (
            ("* * * * *", job(scheduled_at=dt.datetime.now(UTC))),
            {},
            "must not set scheduled_at",
        ),
    ],
)
async def test_bad_schedules_fail_before_any_sql(
    dsn: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    # The pool is never opened: reaching SQL would raise NotConnectedError instead.
    chancy = Chancy(dsn, plugins=[Cron()])
    with pytest.raises(CronValidationError, match=message):
        await Cron.schedule(chancy, *args, **kwargs)
    with pytest.raises(CronValidationError, match=message):
        Cron.sync_schedule(chancy, *args, **kwargs)


def test_time_zone_names_resolve() -> None:
    assert resolve_timezone(None) == ("UTC", UTC)
    assert resolve_timezone(NEW_YORK) == ("America/New_York", NEW_YORK)
    with pytest.raises(CronValidationError):
        resolve_timezone("Nowhere/Special")


async def test_unknown_queue_and_missing_table_are_typed_errors(dsn: str, app: Chancy) -> None:
    with pytest.raises(UnknownQueueError, match="nope"):
        await Cron.schedule(app, "* * * * *", job(queue="nope"))
    assert await Cron.get_schedules(app) == {}
    async with Chancy(dsn, prefix="other_") as bare:
        await bare.migrate()  # no Cron plugin: no cron table
        with pytest.raises(ConfigurationError, match="Cron"):
            await Cron.get_schedules(bare)


def test_plugin_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        Cron(poll_interval=0)
    with pytest.raises(ConfigurationError):
        Cron(batch_size=0)


# -- persistence ------------------------------------------------------------------------


async def test_cron_migrations_go_up_down_and_up_with_the_prefix(dsn: str) -> None:
    async with Chancy(dsn, prefix="x_", plugins=[Cron()]) as chancy:
        assert not await chancy.is_up_to_date()
        await chancy.migrate()
        assert await chancy.is_up_to_date()
        await chancy.declare(Queue("q"))
        await Cron.schedule(chancy, "0 * * * *", job("kept"))
        async with chancy.pool.connection() as conn:
            down = chancy.store.migrate("chancy.cron", "chancy.migrations.cron", 0)
            assert await arun(conn, down) == [-1]
            cur = await conn.execute("SELECT to_regclass('x_cron') IS NULL")
            assert await cur.fetchone() == (True,)
        assert not await chancy.is_up_to_date()
        await chancy.migrate()
        assert await Cron.get_schedules(chancy) == {}
        await Cron.schedule(chancy, "0 * * * *", job("again"))
        assert list(await Cron.get_schedules(chancy)) == ["again"]


async def test_schedules_persist_and_can_be_read_replaced_and_removed(
    dsn: str, app: Chancy
) -> None:
    before = await db_now(app)
    await Cron.schedule(
        app,
        "*/5 * * * *",
        job("report", kwargs={"n": 1}, priority=3, meta={"m": 1}),
        job("cleanup"),
        timezone="Europe/Riga",
    )
    async with Chancy(dsn, plugins=[Cron()]) as other:  # another process's view
        schedules = await Cron.get_schedules(other)
    assert set(schedules) == {"cleanup", "report"}
    report = schedules["report"]
    assert set(report) >= {"unique_key", "job", "cron", "last_run", "next_run", "timezone"}
    assert report["unique_key"] == "report" and report["cron"] == "*/5 * * * *"
    assert report["timezone"] == "Europe/Riga" and report["catch_up"] == 0
    assert report["last_run"] is None
    assert report["job"] == job("report", kwargs={"n": 1}, priority=3, meta={"m": 1})
    next_run = report["next_run"]
    assert before < next_run <= before + dt.timedelta(minutes=5)
    assert next_run.minute % 5 == 0 and next_run.second == 0 and next_run.microsecond == 0

    await Cron.schedule(app, "0 3 * * *", job("report"), catch_up=4)
    replaced = (await Cron.get_schedules(app, unique_keys=["report"]))["report"]
    assert replaced["cron"] == "0 3 * * *" and replaced["timezone"] == "UTC"
    assert replaced["catch_up"] == 4 and replaced["next_run"].hour == 3
    assert list(await Cron.get_schedules(app, unique_keys=["cleanup", "ghost"])) == ["cleanup"]

    assert await Cron.unschedule(app, "report", "ghost") == ["report"]
    assert list(await Cron.get_schedules(app)) == ["cleanup"]
    with pytest.raises(CronValidationError):
        await Cron.get_schedules(app, unique_keys="cleanup")


async def test_sync_twins(dsn: str, app: Chancy) -> None:
    with Chancy(dsn, plugins=[Cron()]) as chancy:
        Cron.sync_schedule(chancy, "0 * * * *", job("hourly"), catch_up=True)
        schedules = Cron.sync_get_schedules(chancy)
        assert schedules["hourly"]["catch_up"] == MAX_CATCH_UP
        assert Cron.sync_get_schedules(chancy, unique_keys=["nothing"]) == {}
        assert Cron.sync_unschedule(chancy, "hourly") == ["hourly"]
        assert Cron.sync_get_schedules(chancy) == {}


# -- enqueueing ---------------------------------------------------------------------------


async def test_a_due_schedule_is_enqueued_once_and_advanced(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("tick", meta={"from": "cron"}))
    assert (await run_pass(app)).schedules == 0  # not due yet
    await make_due(app)
    done = await run_pass(app)
    assert done.schedules == 1 and len(done.pushed) == 1
    key, tick, result = done.pushed[0]
    assert key == "tick" and result.inserted
    now = await db_now(app)
    assert tick <= now and tick.second == 0
    [pushed] = await app.get_jobs([result.reference])
    assert pushed.unique_key == "tick" and pushed.func == "tests.jobs.noop"
    assert pushed.meta == {"from": "cron", "cron_tick": tick.strftime("%Y-%m-%dT%H:%M:%SZ")}
    schedule = (await Cron.get_schedules(app))["tick"]
    assert schedule["last_run"] is not None and schedule["last_run"] <= now
    assert now < schedule["next_run"] <= now + dt.timedelta(minutes=1)
    assert (await run_pass(app)).schedules == 0
    assert len(await cron_jobs(app)) == 1


async def test_only_the_leaseholder_enqueues(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("tick"))
    await make_due(app)
    plugin = app.plugins["chancy.cron"]
    assert isinstance(plugin, Cron)
    async with app.pool.connection() as conn:
        assert await arun(conn, app.store.acquire_lease("current", 30))
        async with conn.transaction():
            stale = await arun(conn, plugin.enqueue_due_op(app, "stale"))
    assert stale.schedules == 0 and await cron_jobs(app) == []
    assert (await run_pass(app, "current")).schedules == 1


async def test_a_tick_while_the_previous_run_is_live_joins_it(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("tick"))
    await make_due(app)
    first = (await run_pass(app)).pushed[0][2]
    await make_due(app)
    second = (await run_pass(app)).pushed[0][2]
    assert first.inserted and not second.inserted
    assert second.reference == first.reference and len(await cron_jobs(app)) == 1


async def test_concurrent_passes_enqueue_each_tick_once(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", *(job(f"k{i}") for i in range(5)))
    for _ in range(5):
        await make_due(app)
        passes = await asyncio.gather(*(run_pass(app) for _ in range(3)))
        assert sum(p.schedules for p in passes) == 5
        # Let the next round's pushes insert rather than join the live jobs.
        async with app.pool.connection() as conn:
            await conn.execute(
                "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now()"
                " WHERE state = 'pending'"
            )
    jobs = await cron_jobs(app)
    assert len(jobs) == 25
    by_key: dict[str, int] = {}
    for row in jobs:
        by_key[row["unique_key"]] = by_key.get(row["unique_key"], 0) + 1
    assert by_key == {f"k{i}": 5 for i in range(5)}


async def test_a_pass_skips_rows_another_pass_holds(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("tick"))
    await make_due(app)
    plugin = app.plugins["chancy.cron"]
    assert isinstance(plugin, Cron)
    async with app.pool.connection() as conn:
        assert await arun(conn, app.store.acquire_lease("leader", 30))
        async with conn.transaction():
            held = await arun(conn, plugin.enqueue_due_op(app, "leader"))
            assert held.schedules == 1
            # Another pass while the first transaction is open: the row is locked.
            assert (await asyncio.wait_for(run_pass(app), 10)).schedules == 0
        # After the commit the row is no longer due.
        assert (await run_pass(app)).schedules == 0
    assert len(await cron_jobs(app)) == 1


async def test_jobs_of_a_deleted_queue_are_skipped_and_others_still_run(app: Chancy) -> None:
    await app.declare(Queue("doomed"))
    await Cron.schedule(app, "* * * * *", job("kept"), job("lost", queue="doomed"))
    await app.delete_queue("doomed")
    await make_due(app)
    done = await run_pass(app)
    assert done.schedules == 2 and [p[0] for p in done.pushed] == ["kept"]
    schedules = await Cron.get_schedules(app)
    assert all(s["last_run"] is not None for s in schedules.values())


async def test_a_broken_schedule_goes_dormant_without_blocking_others(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("good"), job("bad"))
    async with app.pool.connection() as conn:
        await conn.execute("UPDATE chancy_cron SET cron = 'garbage' WHERE unique_key = 'bad'")
    await make_due(app)
    done = await run_pass(app)
    assert done.schedules == 2 and [p[0] for p in done.pushed] == ["good"]
    schedules = await Cron.get_schedules(app)
    assert schedules["bad"]["next_run"] is None and schedules["good"]["next_run"] is not None
    await Cron.schedule(app, "* * * * *", job("bad"))  # scheduling again revives it
    assert (await Cron.get_schedules(app))["bad"]["next_run"] is not None


# -- catch-up policy ----------------------------------------------------------------------


async def test_missed_ticks_are_skipped_by_default(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("skip"))
    await make_due(app, 10)
    done = await run_pass(app)
    now = await db_now(app)
    [(_, tick, _)] = done.pushed
    # The one run is for the most recent tick; the next is the next future minute.
    assert now - dt.timedelta(minutes=1) < tick <= now
    schedule = (await Cron.get_schedules(app))["skip"]
    assert now < schedule["next_run"] <= now + dt.timedelta(minutes=1)
    assert (await run_pass(app)).pushed == []


async def test_catch_up_enqueues_one_job_per_missed_tick_up_to_its_cap(app: Chancy) -> None:
    await Cron.schedule(app, "* * * * *", job("few"), catch_up=True)
    await Cron.schedule(app, "* * * * *", job("capped"), catch_up=3)
    await make_due(app, 4, "few")
    await make_due(app, 10, "capped")
    due = {k: s["next_run"] for k, s in (await Cron.get_schedules(app)).items()}
    done = await run_pass(app)
    ticks: dict[str, list[dt.datetime]] = {}
    for key, tick, result in done.pushed:
        assert result.inserted
        ticks.setdefault(key, []).append(tick)
    now = await db_now(app)
    # Every minute from the due one to the current one (5, unless a minute just began).
    missed = (ticks["few"][-1] - due["few"]) // dt.timedelta(minutes=1) + 1
    assert missed in (5, 6)
    for key, count in (("few", missed), ("capped", 3)):
        assert len(ticks[key]) == count
        # Consecutive minutes, the latest at most a minute old: the most recent ticks.
        gaps = {b - a for a, b in itertools.pairwise(ticks[key])}
        assert gaps == {dt.timedelta(minutes=1)}
        assert now - dt.timedelta(minutes=1) < ticks[key][-1] <= now
    rows = await cron_jobs(app)
    keys = {r["unique_key"] for r in rows}
    assert len(rows) == len(keys) == missed + 3  # one job per tick, each under its own key
    expected = {f"capped@{t:%Y-%m-%dT%H:%M:%SZ}" for t in ticks["capped"]}
    assert expected <= keys
    assert {r["meta"]["cron_tick"] for r in rows} >= {
        t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in ticks["few"]
    }
    assert (await run_pass(app)).pushed == []


# -- time zones and daylight saving time -----------------------------------------------------


def test_next_tick_is_computed_in_the_schedule_time_zone() -> None:
    after = utc(2026, 1, 15, 12, 0)
    assert next_tick("0 9 * * *", UTC, after) == utc(2026, 1, 16, 9, 0)
    assert next_tick("0 9 * * *", NEW_YORK, after) == utc(2026, 1, 15, 14, 0)  # 09:00 EST
    assert next_tick("0 9 * * *", ZoneInfo("Asia/Tokyo"), after) == utc(2026, 1, 16, 0, 0)
    assert next_tick("* * */20 * 1L", UTC, after) is None


def test_spring_forward_runs_a_skipped_daily_time_right_after_the_gap() -> None:
    # New York, 2026-03-08: clocks jump from 02:00 EST to 03:00 EDT; 02:30 does not exist.
    day_before = dt.datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK)
    first = next_tick("30 2 * * *", NEW_YORK, day_before)
    assert first == utc(2026, 3, 8, 7, 0)  # 03:00 EDT, just after the gap
    assert next_tick("30 2 * * *", NEW_YORK, first) == utc(2026, 3, 9, 6, 30)  # 02:30 EDT
    # An hourly job has no 02:30 that day: 01:30 EST is followed by 03:30 EDT.
    hourly = next_tick("30 * * * *", NEW_YORK, utc(2026, 3, 8, 6, 30))
    assert hourly == utc(2026, 3, 8, 7, 30)


def test_fall_back_runs_a_daily_time_once_and_an_hourly_job_in_both_hours() -> None:
    # New York, 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST; 01:30 happens twice.
    day_before = dt.datetime(2026, 10, 31, 12, 0, tzinfo=NEW_YORK)
    first = next_tick("30 1 * * *", NEW_YORK, day_before)
    assert first == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, the first of the two
    assert next_tick("30 1 * * *", NEW_YORK, first) == utc(2026, 11, 2, 6, 30)  # next day
    hourly = [utc(2026, 11, 1, 4, 0)]
    for _ in range(3):
        tick = next_tick("30 * * * *", NEW_YORK, hourly[-1])
        assert tick is not None
        hourly.append(tick)
    # 00:30 EDT, 01:30 EDT, 01:30 EST: an hour apart in real time, as cron runs them.
    assert hourly[1:] == [utc(2026, 11, 1, 4, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30)]


def test_due_ticks_are_the_most_recent_and_fall_back_to_the_due_time() -> None:
    now = utc(2026, 5, 1, 12, 0, 30)
    ticks = due_ticks("*/10 * * * *", UTC, utc(2026, 5, 1, 11, 0), now, 3)
    assert ticks == [utc(2026, 5, 1, 11, 40), utc(2026, 5, 1, 11, 50), utc(2026, 5, 1, 12, 0)]
    assert due_ticks("*/10 * * * *", UTC, utc(2026, 5, 1, 11, 45), now, 100) == ticks[1:]
    # A tick exactly at `now` is due.
    assert due_ticks("0 12 * * *", UTC, utc(2026, 5, 1, 12), utc(2026, 5, 1, 12), 1) == [
        utc(2026, 5, 1, 12)
    ]
    # No tick in [due, now] (the expression changed since next_run was stored).
    due = utc(2026, 5, 1, 12, 0, 10)
    assert due_ticks("0 0 1 1 *", UTC, due, now, 5) == [due]


def test_catch_up_across_dst_changes_sees_the_same_ticks_as_forward_scheduling() -> None:
    for expr, start in (
        ("30 2 * * *", utc(2026, 3, 6)),  # spring forward
        ("30 1 * * *", utc(2026, 10, 30)),  # fall back, daily
        ("30 * * * *", utc(2026, 10, 31, 23)),  # fall back, hourly
    ):
        forward: list[dt.datetime] = []
        moment: dt.datetime | None = start
        for _ in range(5):
            assert moment is not None
            moment = next_tick(expr, NEW_YORK, moment)
            assert moment is not None
            forward.append(moment)
        now = forward[-1] + dt.timedelta(seconds=5)
        assert due_ticks(expr, NEW_YORK, forward[0], now, 100) == forward


async def test_next_run_is_computed_from_the_database_clock_in_the_zone(app: Chancy) -> None:
    await Cron.schedule(app, "0 9 * * *", job("ny"), timezone="America/New_York")
    await make_due(app)
    await run_pass(app)
    schedule = (await Cron.get_schedules(app))["ny"]
    assert schedule["next_run"] == next_tick("0 9 * * *", NEW_YORK, schedule["last_run"])
    assert schedule["next_run"].astimezone(NEW_YORK).hour == 9


# -- with real workers --------------------------------------------------------------------


async def test_three_workers_enqueue_each_tick_exactly_once(dsn: str) -> None:
    plugins = [Leadership(poll_interval=0.1, timeout=1), Cron(poll_interval=0.05)]
    async with Chancy(dsn, plugins=plugins, no_default_plugins=True) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
        await Cron.schedule(app, "* * * * * *", job("every-second"))  # seconds field

        async def ticks() -> set[str]:
            return {r["meta"]["cron_tick"] for r in await cron_jobs(app)}

        async with (
            serving(app, worker_id="w1") as w1,
            serving(app, worker_id="w2") as w2,
            serving(app, worker_id="w3") as w3,
        ):
            workers: list[Worker] = [w1, w2, w3]
            await poll(lambda: _at_least(ticks, 4), timeout=30)
            # Fail over: the leader stops and another worker takes over the schedule.
            leader = next(w for w in workers if w.is_leader.is_set())
            seen = len(await ticks())
            await leader.stop()
            await poll(lambda: _at_least(ticks, seen + 3), timeout=30)
        rows = await cron_jobs(app)
    per_tick: dict[str, int] = {}
    for row in rows:
        per_tick[row["meta"]["cron_tick"]] = per_tick.get(row["meta"]["cron_tick"], 0) + 1
    assert len(per_tick) >= 7
    assert set(per_tick.values()) == {1}, per_tick


async def _at_least(ticks: Any, count: int) -> bool:
    return len(await ticks()) >= count
