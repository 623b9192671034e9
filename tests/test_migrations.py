"""Migrations: numbered, up and down, safe to run concurrently, prefix-aware."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from chancy import Chancy, Job, Queue, Worker
from chancy.errors import InvalidNameError, MigrationsNeededError
from chancy.store import migration_steps


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    return {r[0] for r in rows}


async def test_up_down_up(dsn: str) -> None:
    app = Chancy(dsn, no_default_plugins=True)  # to_version moves core only
    async with app:
        assert not await app.is_up_to_date()
        await app.migrate()
        assert await app.is_up_to_date()
        assert {"chancy_jobs", "chancy_queues", "chancy_workers", "chancy_leader"} <= _tables(dsn)
        await app.migrate(to_version=0)
        assert _tables(dsn) - {"chancy_metrics"} == {"chancy_versions"}  # core only
        assert not await app.is_up_to_date()
        await app.migrate()
        assert await app.is_up_to_date()
        await app.declare(Queue("default"))
        ref = await app.push("default", Job(func="tests.jobs.noop"))
        assert await app.get_job(ref) is not None


async def test_migrate_is_idempotent_and_concurrent(dsn: str) -> None:
    apps = [Chancy(dsn) for _ in range(4)]
    for app in apps:
        await app.__aenter__()
    try:
        await asyncio.gather(*(app.migrate() for app in apps))
        await apps[0].migrate()
        assert await apps[0].is_up_to_date()
    finally:
        for app in apps:
            await app.__aexit__(None, None, None)


async def test_worker_refuses_to_start_before_migrations(dsn: str) -> None:
    async with Chancy(dsn) as app:
        with pytest.raises(MigrationsNeededError):
            await Worker(app, register_signal_handlers=False).start()


async def test_custom_prefix_isolates_tables(dsn: str) -> None:
    async with Chancy(dsn, prefix="other_") as other, Chancy(dsn) as default:
        await other.migrate()
        await default.migrate()
        await other.declare(Queue("q"))
        assert await default.get_queue("q") is None
        assert (await other.get_queue("q")) is not None
    assert {"other_jobs", "chancy_jobs"} <= _tables(dsn)


@pytest.mark.parametrize("prefix", ["Bad", 'x"; DROP TABLE y; --', "1abc", "", "a" * 31])
def test_prefix_is_validated(prefix: str) -> None:
    with pytest.raises(InvalidNameError):
        Chancy("dbname=test", prefix=prefix)


def test_every_migration_has_up_and_down() -> None:
    steps = migration_steps("chancy.migrations.core")
    assert sorted(steps) == list(range(1, max(steps) + 1))
    assert all(up.strip() and down.strip() for up, down in steps.values())


def test_sync_migrate(dsn: str) -> None:
    with Chancy(dsn) as app:
        app.sync_migrate()
        app.sync_declare(Queue("s"))
        ref = app.sync_push("s", Job(func="tests.jobs.noop"))
        found = app.sync_get_job(ref)
        assert found is not None and found.queue == "s"
