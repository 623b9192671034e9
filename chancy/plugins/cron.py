"""Cron: run jobs on cron schedules stored in the database.

Schedules live in the ``{prefix}cron`` table, one row per job ``unique_key``. The leader
enqueues due schedules in one transaction per batch: it locks the due rows (``FOR UPDATE
SKIP LOCKED``), pushes their jobs through the core push operation and moves ``next_run``
to the next tick, so each tick is enqueued once however many workers run. Ticks are
computed with `cronsim <https://pypi.org/project/cronsim/>`_ (``pip install
chancy[cron]``) in each schedule's time zone, from the database clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import zoneinfo
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from chancy.errors import ConfigurationError, CronValidationError, UnknownQueueError
from chancy.job import Job, Limit
from chancy.plugin import Plugin
from chancy.store import Op, PushResult, Row, arun, dumps
from chancy.store import cron as cron_store

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.worker import Worker

T = TypeVar("T")

#: The most missed ticks one schedule may enqueue at once (``catch_up=True`` uses it).
MAX_CATCH_UP = 100
#: Meta key added to every job Cron enqueues: the tick it runs for (ISO 8601, UTC).
TICK_META_KEY = "cron_tick"
_UTC = dt.UTC
_ONE_MICROSECOND = dt.timedelta(microseconds=1)


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError("Cron needs cronsim: pip install 'chancy[cron]'") from None
    return cronsim


def resolve_timezone(name: str | dt.tzinfo | None) -> tuple[str, dt.tzinfo]:
    """The (key, tzinfo) of a time zone name, ``ZoneInfo`` or None (UTC); raises
    :class:`CronValidationError` for an unknown zone."""
    if name is None or name == "UTC" or name is _UTC:
        return "UTC", _UTC
    if isinstance(name, zoneinfo.ZoneInfo):
        if not name.key:
            raise CronValidationError("a ZoneInfo built from a file has no name to store")
        name = name.key
    if not isinstance(name, str):
        raise CronValidationError(f"timezone must be an IANA name like 'Europe/Riga', not {name!r}")
    try:
        return name, zoneinfo.ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError for paths, OSError, ...
        raise CronValidationError(f"unknown time zone {name!r}") from None


def validate_expression(expr: object, tz: dt.tzinfo = _UTC) -> str:
    """Return ``expr`` if cronsim accepts it and it ever fires, else raise
    :class:`CronValidationError`."""
    cronsim = _cronsim()
    if not isinstance(expr, str) or not expr.strip() or len(expr) > 1000:
        raise CronValidationError(f"invalid cron expression {expr!r}")
    try:
        iterator = cronsim.CronSim(expr, dt.datetime.now(tz))
    except cronsim.CronSimError as exc:
        raise CronValidationError(f"invalid cron expression {expr!r}: {exc}") from None
    if next(iterator, None) is None:
        raise CronValidationError(f"cron expression {expr!r} never fires")
    return expr


def next_tick(expr: str, tz: dt.tzinfo, after: dt.datetime) -> dt.datetime | None:
    """The first tick of ``expr`` in zone ``tz`` strictly after ``after``, in UTC (None if
    there is none within cronsim's 50-year horizon).

    Daylight saving time follows Debian cron (as cronsim does): a daily job whose local
    time is skipped when clocks go forward runs right after the gap (a 02:30 job runs at
    03:00 that day); when clocks go back, a daily job in the repeated hour runs once (the
    first 01:30), while jobs firing every hour or more often run in both copies of it.
    """
    iterator = _cronsim().CronSim(expr, after.astimezone(tz))
    tick: dt.datetime | None = next(iterator, None)
    return None if tick is None else tick.astimezone(_UTC)


def due_ticks(
    expr: str, tz: dt.tzinfo, due: dt.datetime, now: dt.datetime, limit: int
) -> list[dt.datetime]:
    """The most recent ``limit`` ticks in ``[due, now]``, oldest first, in UTC.

    ``due`` is the stored ``next_run`` that has passed; when no tick is found (the
    expression changed meanwhile) ``due`` itself is the one tick to run."""
    ticks: list[dt.datetime] = []
    # Reverse iteration yields ticks strictly before its start: start just after now.
    iterator: Iterator[dt.datetime] = _cronsim().CronSim(
        expr, (now + _ONE_MICROSECOND).astimezone(tz), reverse=True
    )
    for tick in iterator:
        if tick < due or len(ticks) >= limit:
            break
        ticks.append(tick.astimezone(_UTC))
    ticks.reverse()
    return ticks or [due.astimezone(_UTC)]


def job_to_json(job: Job) -> str:
    """The JSON stored for a scheduled job (its kwargs and meta must be JSON)."""
    return dumps(
        {
            "func": job.func,
            "queue": job.queue,
            "kwargs": dict(job.kwargs),
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            "limits": [limit.to_dict() for limit in job.limits],
            "unique_key": job.unique_key,
            "meta": dict(job.meta),
        },
        f"scheduled job {job.func}",
    )


def job_from_json(data: dict[str, Any]) -> Job:
    """Rebuild a scheduled job from :func:`job_to_json` output."""
    return Job(
        func=data["func"],
        queue=data["queue"],
        kwargs=data.get("kwargs") or {},
        priority=data.get("priority", 0),
        max_attempts=data.get("max_attempts", 1),
        limits=[Limit.from_dict(limit) for limit in data.get("limits") or ()],
        unique_key=data["unique_key"],
        meta=data.get("meta") or {},
    )


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True, slots=True)
class CronPass:
    """What one enqueue pass did."""

    #: (schedule key, tick, job reference, newly inserted) per job pushed.
    pushed: list[tuple[str, dt.datetime, PushResult]]
    #: How many schedules were due and advanced.
    schedules: int
    #: Seconds of database time until the next schedule is due (None: nothing scheduled).
    seconds_until_due: float | None


class Cron(Plugin):
    """Enqueues scheduled jobs when their cron expression fires (not a default plugin).

    The leader checks every ``poll_interval`` seconds at most, sooner when a schedule is
    due earlier, and enqueues up to ``batch_size`` due schedules per transaction.

    Missed ticks (no worker was running): by default a schedule runs once for the most
    recent missed tick, then continues with the next future tick. ``catch_up=True`` (or a
    number) on :meth:`schedule` enqueues one job per missed tick instead, the most recent
    :data:`MAX_CATCH_UP` (or that number) of them.

    The pushed job keeps its ``unique_key``, so a tick that comes while the previous run
    is still pending or running joins that run instead of starting a second one. A
    catch-up schedule pushes each tick under ``"<unique_key>@<tick>"`` so its ticks do
    not absorb each other (and may overlap). Every job gets ``meta["cron_tick"]``, the
    tick it runs for (ISO 8601, UTC).
    """

    def __init__(self, poll_interval: float = 1, *, batch_size: int = 100) -> None:
        if not poll_interval > 0 or batch_size < 1:
            raise ConfigurationError("Cron needs poll_interval > 0 and batch_size >= 1")
        _cronsim()
        self.poll_interval = poll_interval
        self.batch_size = batch_size

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.cron"

    def migrations_package(self) -> str | None:
        return "chancy.migrations.cron"

    # -- the leader's service ----------------------------------------------------------

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        while not worker.stopping.is_set():
            await self.wait_for_leader(worker)
            done = await self.enqueue_due(worker, chancy)
            await self.sleep(worker, self._delay(done))

    def _delay(self, done: CronPass) -> float:
        seconds = done.seconds_until_due
        if seconds is None:
            return self.poll_interval
        if seconds <= 0 and not done.schedules:
            # Due rows we could not take (locked, or the lease lapsed): do not spin.
            return self.poll_interval
        return min(self.poll_interval, max(seconds, 0.0) + 0.001)

    async def enqueue_due(self, worker: Worker, chancy: Chancy) -> CronPass:
        """Enqueue every due schedule now, one transaction per batch."""
        pushed: list[tuple[str, dt.datetime, PushResult]] = []
        schedules = 0
        while True:
            async with worker.pool.connection() as conn, conn.transaction():
                done = await arun(conn, self.enqueue_due_op(chancy, worker.worker_id))
            pushed.extend(done.pushed)
            schedules += done.schedules
            if done.schedules < self.batch_size or not worker.is_leader.is_set():
                break
        inserted = [p for p in pushed if p[2].inserted]
        if pushed:
            worker.hub.emit("cron.enqueued", pushed)
            joined = len(pushed) - len(inserted)
            worker.log.debug("cron: %d job(s) enqueued, %d joined live runs", len(inserted), joined)
        return CronPass(pushed, schedules, done.seconds_until_due)

    def enqueue_due_op(self, chancy: Chancy, leader: str) -> Op[CronPass]:
        """One batch as a store operation; run it inside a transaction. Does nothing
        unless ``leader`` holds the leadership lease."""
        store = chancy.store
        rows = yield from cron_store.lock_due_schedules(store, leader, self.batch_size)
        jobs: list[tuple[str, dt.datetime, Job]] = []
        advances: list[tuple[str, dt.datetime | None]] = []
        for row in rows:
            try:
                planned, following = self._plan(row)
            except Exception:
                # A schedule that can no longer be computed goes dormant (next_run NULL)
                # instead of failing every pass; scheduling it again revives it.
                chancy.log.exception("cron: schedule %r is broken; disabling it", row["unique_key"])
                planned, following = [], None
            jobs.extend(planned)
            advances.append((row["unique_key"], following))
        pushed = yield from self._push_op(chancy, jobs)
        yield from cron_store.advance_schedules(store, advances)
        seconds = yield from cron_store.seconds_until_due(store)
        return CronPass(pushed, len(rows), seconds)

    def _plan(self, row: Row) -> tuple[list[tuple[str, dt.datetime, Job]], dt.datetime | None]:
        key: str = row["unique_key"]
        _, tz = resolve_timezone(row["timezone"])
        now: dt.datetime = row["db_now"]
        template = job_from_json(row["job"])
        catch_up: int = row["catch_up"]
        ticks = due_ticks(row["cron"], tz, row["next_run"], now, max(catch_up, 1))
        planned = []
        for tick in ticks:
            job = template.with_meta({**template.meta, TICK_META_KEY: _iso(tick)})
            if catch_up:
                job = job.with_unique_key(f"{key}@{_iso(tick)}")
            planned.append((key, tick, job))
        return planned, next_tick(row["cron"], tz, now)

    def _push_op(
        self, chancy: Chancy, planned: list[tuple[str, dt.datetime, Job]]
    ) -> Op[list[tuple[str, dt.datetime, PushResult]]]:
        # Jobs of a queue that was deleted since are dropped (and logged), not the batch.
        while planned:
            result = yield from chancy.store.push_jobs(
                [job for _, _, job in planned],
                require_queues=chancy.require_declared_queues,
                notify=chancy.notifications,
            )
            if result and isinstance(result[0], str):
                missing = {str(name) for name in result}
                chancy.log.warning("cron: skipping jobs for undeclared queue(s) %s", missing)
                planned = [p for p in planned if p[2].queue not in missing]
                continue
            pushes = [r for r in result if isinstance(r, PushResult)]
            return [(key, tick, r) for (key, tick, _), r in zip(planned, pushes, strict=True)]
        return []

    # -- managing schedules ------------------------------------------------------------

    @classmethod
    async def schedule(
        cls,
        chancy: Chancy,
        expr: str,
        *jobs: Job,
        timezone: str | dt.tzinfo | None = None,
        catch_up: bool | int = False,
    ) -> None:
        """Run each of ``jobs`` whenever ``expr`` fires in ``timezone`` (default UTC).
        Each job needs a ``unique_key``, which names its schedule; scheduling a key
        again replaces its schedule. ``catch_up``: see :class:`Cron`."""
        op = cls._schedule_op(chancy, expr, jobs, timezone, catch_up)
        await _translate_missing_table(chancy._run(op, transaction=True))

    @classmethod
    def sync_schedule(
        cls,
        chancy: Chancy,
        expr: str,
        *jobs: Job,
        timezone: str | dt.tzinfo | None = None,
        catch_up: bool | int = False,
    ) -> None:
        """Sync twin of :meth:`schedule`."""
        op = cls._schedule_op(chancy, expr, jobs, timezone, catch_up)
        with _missing_table_hint():
            chancy._sync_run(op, transaction=True)

    @classmethod
    async def unschedule(cls, chancy: Chancy, *unique_keys: str) -> list[str]:
        """Delete the schedules of ``unique_keys``; returns the keys that existed. Jobs
        already enqueued are left alone."""
        keys = _keys(unique_keys)
        return await _translate_missing_table(
            chancy._run(cron_store.delete_schedules(chancy.store, keys))
        )

    @classmethod
    def sync_unschedule(cls, chancy: Chancy, *unique_keys: str) -> list[str]:
        """Sync twin of :meth:`unschedule`."""
        keys = _keys(unique_keys)
        with _missing_table_hint():
            return chancy._sync_run(cron_store.delete_schedules(chancy.store, keys))

    @classmethod
    async def get_schedules(
        cls, chancy: Chancy, *, unique_keys: Iterable[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Schedules by unique key: ``unique_key``, ``job`` (a :class:`~chancy.job.Job`),
        ``cron``, ``timezone``, ``catch_up``, ``last_run`` and ``next_run``."""
        keys = None if unique_keys is None else _keys(unique_keys)
        rows = await _translate_missing_table(
            chancy._run(cron_store.select_schedules(chancy.store, keys))
        )
        return {r["unique_key"]: _schedule_dict(r) for r in rows}

    @classmethod
    def sync_get_schedules(
        cls, chancy: Chancy, *, unique_keys: Iterable[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Sync twin of :meth:`get_schedules`."""
        keys = None if unique_keys is None else _keys(unique_keys)
        with _missing_table_hint():
            rows = chancy._sync_run(cron_store.select_schedules(chancy.store, keys))
        return {r["unique_key"]: _schedule_dict(r) for r in rows}

    @classmethod
    def _schedule_op(
        cls,
        chancy: Chancy,
        expr: str,
        jobs: Sequence[Job],
        timezone: str | dt.tzinfo | None,
        catch_up: bool | int,
    ) -> Op[None]:
        # Everything is checked here, before the operation runs any SQL.
        zone_name, tz = resolve_timezone(timezone)
        expr = validate_expression(expr, tz)
        if isinstance(catch_up, bool):
            limit = MAX_CATCH_UP if catch_up else 0
        elif isinstance(catch_up, int) and 0 <= catch_up <= MAX_CATCH_UP:
            limit = catch_up
        else:
            raise CronValidationError(
                f"catch_up must be a bool or an int in [0, {MAX_CATCH_UP}], not {catch_up!r}"
            )
        if not jobs:
            raise CronValidationError("schedule() needs at least one job")
        seen: set[str] = set()
        encoded: list[tuple[str, str]] = []
        for job in jobs:
            if not isinstance(job, Job):
                raise CronValidationError(f"schedule() needs Job instances, not {job!r}")
            if job.unique_key is None:
                raise CronValidationError(
                    f"scheduled job {job.func} needs a unique_key (it names the schedule)"
                )
            if job.unique_key in seen:
                raise CronValidationError(f"unique_key {job.unique_key!r} is given twice")
            if limit and len(job.unique_key) > 1000:
                raise CronValidationError(
                    "a catch-up schedule's unique_key must be at most 1000 characters"
                )
            if job.scheduled_at is not None:
                raise CronValidationError(
                    f"scheduled job {job.func} must not set scheduled_at: the schedule decides"
                )
            seen.add(job.unique_key)
            encoded.append((job.unique_key, job_to_json(job)))
        queues = [job.queue for job in jobs] if chancy.require_declared_queues else []
        return cls._write_schedules(chancy, expr, zone_name, tz, limit, encoded, queues)

    @staticmethod
    def _write_schedules(
        chancy: Chancy,
        expr: str,
        zone_name: str,
        tz: dt.tzinfo,
        catch_up: int,
        encoded: list[tuple[str, str]],
        queues: list[str],
    ) -> Op[None]:
        now, missing = yield from cron_store.check_queues(chancy.store, queues)
        if missing:
            raise UnknownQueueError(missing)
        following = next_tick(expr, tz, now)
        rows = [
            cron_store.ScheduleRow(key, text, expr, zone_name, catch_up, following)
            for key, text in encoded
        ]
        yield from cron_store.upsert_schedules(chancy.store, rows)


def _keys(unique_keys: Iterable[str]) -> list[str]:
    if isinstance(unique_keys, str):
        raise CronValidationError("unique_keys must be a list of str, not a single str")
    keys = list(unique_keys)
    if not all(isinstance(k, str) for k in keys):
        raise CronValidationError(f"unique keys must be str: {keys!r}")
    return keys


def _schedule_dict(row: Row) -> dict[str, Any]:
    job = row["job"]
    return {
        "unique_key": row["unique_key"],
        "job": job_from_json(job if isinstance(job, dict) else json.loads(job)),
        "cron": row["cron"],
        "timezone": row["timezone"],
        "catch_up": row["catch_up"],
        "last_run": row["last_run"],
        "next_run": row["next_run"],
    }


_MISSING_TABLE = (
    "the cron table does not exist: add chancy.plugins.cron.Cron() to "
    "Chancy(plugins=[...]) and run chancy.migrate()"
)


async def _translate_missing_table(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(_MISSING_TABLE) from None


@contextlib.contextmanager
def _missing_table_hint() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(_MISSING_TABLE) from None
