"""Store operations of the Cron plugin: the ``{cron}`` schedules table.

Written in the same generator style as :class:`~chancy.store.Store` methods, so the plugin
can compose them with core operations (such as ``push_jobs``) inside one transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence

from chancy.store import Op, Row, Store


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One schedule as written by :func:`upsert_schedules`."""

    unique_key: str
    job: str  # JSON text of the job template
    cron: str
    timezone: str
    catch_up: int
    next_run: dt.datetime | None


def check_queues(store: Store, queues: Iterable[str]) -> Op[tuple[dt.datetime, list[str]]]:
    """The database clock, and which of ``queues`` are not declared."""
    rows = yield store.q("cron_check_queues_one"), {"queues": sorted(set(queues))}
    return rows[0]["db_now"], list(rows[0]["missing"])


def upsert_schedules(store: Store, schedules: Sequence[ScheduleRow]) -> Op[None]:
    """Create or replace schedules in one statement (a replaced one keeps its last_run)."""
    if not schedules:
        return
    yield (
        store.q("cron_upsert_schedules_many"),
        {
            "unique_key": [s.unique_key for s in schedules],
            "job": [s.job for s in schedules],
            "cron": [s.cron for s in schedules],
            "timezone": [s.timezone for s in schedules],
            "catch_up": [s.catch_up for s in schedules],
            "next_run": [s.next_run for s in schedules],
        },
    )


def delete_schedules(store: Store, unique_keys: Sequence[str]) -> Op[list[str]]:
    """Delete schedules; returns the keys that existed."""
    if not unique_keys:
        return []
    rows = yield store.q("cron_delete_schedules_many"), {"unique_keys": list(unique_keys)}
    return sorted(r["unique_key"] for r in rows)


def select_schedules(store: Store, unique_keys: Sequence[str] | None) -> Op[list[Row]]:
    """Every schedule, or those among ``unique_keys``, by key."""
    if unique_keys is None:
        rows = yield store.q("cron_select_schedules_all"), None
    else:
        rows = yield store.q("cron_select_schedules_many"), {"unique_keys": list(unique_keys)}
    return rows


def lock_due_schedules(store: Store, leader: str, limit: int) -> Op[list[Row]]:
    """As leaseholder ``leader``, lock up to ``limit`` due schedules until the end of the
    transaction (each row carries ``db_now``). Nothing if the lease is not held."""
    rows = yield store.q("cron_lock_due_many"), {"leader": leader, "limit": limit}
    return rows


def advance_schedules(
    store: Store, next_runs: Sequence[tuple[str, dt.datetime | None]]
) -> Op[None]:
    """Set ``last_run`` to now and ``next_run`` per (unique_key, next_run) pair."""
    if not next_runs:
        return
    yield (
        store.q("cron_advance_schedules_many"),
        {"unique_key": [k for k, _ in next_runs], "next_run": [n for _, n in next_runs]},
    )


def seconds_until_due(store: Store) -> Op[float | None]:
    """Seconds of database time until the earliest schedule is due, or None if none is."""
    rows = yield store.q("cron_seconds_until_due_one"), None
    seconds = rows[0]["seconds"]
    return None if seconds is None else float(seconds)
