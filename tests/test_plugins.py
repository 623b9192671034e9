"""Default plugins (Leadership, Recovery, Pruner) and the RetryPlugin."""

from __future__ import annotations

import asyncio
import time

import pytest

from chancy import Chancy, Job, Queue, Worker
from chancy.errors import ConfigurationError
from chancy.plugin import Plugin
from chancy.plugins.leadership import Leadership
from chancy.plugins.pruner import Pruner
from chancy.plugins.recovery import Recovery
from chancy.plugins.retry import RetryPlugin
from chancy.rule import Age, State
from chancy.rule import Queue as QueueField
from chancy.store import arun
from tests.test_worker import poll, serving


def fast_plugins() -> list[Plugin]:
    return [
        Leadership(poll_interval=0.1, timeout=1),
        Recovery(poll_interval=0.1),
        Pruner(Age() > 3600, poll_interval=0.1),
    ]


def test_default_plugins_and_replacement(dsn: str) -> None:
    ids = set(Chancy(dsn).plugins)
    assert {
        "chancy.leadership",
        "chancy.recovery",
        "chancy.pruner",
        "chancy.workflow",
        "chancy.metrics",
    } == ids
    custom = Leadership(poll_interval=1, timeout=3)
    app = Chancy(dsn, plugins=[custom])
    assert app.plugins["chancy.leadership"] is custom and len(app.plugins) == len(ids)
    assert Chancy(dsn, no_default_plugins=True).plugins == {}


@pytest.mark.parametrize(
    "build",
    [
        lambda: Leadership(poll_interval=5, timeout=5),
        lambda: Recovery(poll_interval=0),
        lambda: Pruner(maximum_to_prune=0),
        lambda: Pruner("age > 1"),  # type: ignore[arg-type]
    ],
)
def test_plugin_settings_are_validated(build: object) -> None:
    with pytest.raises(ConfigurationError):
        build()  # type: ignore[operator]


async def test_one_leader_released_on_stop_and_taken_over(dsn: str) -> None:
    async with Chancy(dsn, plugins=fast_plugins()) as app:
        await app.migrate()
        async with serving(app, worker_id="a") as a, serving(app, worker_id="b") as b:
            await poll(lambda: a.is_leader.is_set() or b.is_leader.is_set())
            for _ in range(10):
                assert a.is_leader.is_set() + b.is_leader.is_set() <= 1
                await asyncio.sleep(0.05)
            leader, other = (a, b) if a.is_leader.is_set() else (b, a)
            lease = await arun_lease(app)
            assert lease is not None and lease["worker_id"] == leader.worker_id
            await leader.stop()
            assert (
                await arun_lease(app) is None
                or (await arun_lease(app))["worker_id"] != leader.worker_id
            )  # type: ignore[index]
            await poll(lambda: other.is_leader.is_set(), timeout=5)
        workers = await app.get_all_workers()
        assert workers == []


async def arun_lease(app: Chancy) -> dict[str, object] | None:
    async with app.pool.connection() as conn:
        return await arun(conn, app.store.get_lease())


async def test_lease_is_renewed_only_by_its_owner(chancy: Chancy) -> None:
    store = chancy.store
    async with chancy.pool.connection() as conn:
        assert await arun(conn, store.acquire_lease("a", 30))
        assert not await arun(conn, store.acquire_lease("b", 30))
        assert await arun(conn, store.acquire_lease("a", 30))
        await arun(conn, store.release_lease("b"))  # not the owner: no effect
        assert (await arun(conn, store.get_lease()))["worker_id"] == "a"  # type: ignore[index]
        await conn.execute("UPDATE chancy_leader SET expires_at = now() - interval '1 second'")
        assert await arun(conn, store.acquire_lease("b", 30))
        assert not await arun(conn, store.acquire_lease("a", 30))


async def test_recovery_returns_jobs_of_dead_workers(dsn: str) -> None:
    async with Chancy(dsn, plugins=fast_plugins()) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        store = app.store
        again = await app.push(
            Job(func="tests.jobs.add", queue="q", kwargs={"a": 1, "b": 1}, max_attempts=2)
        )
        last = await app.push(Job(func="tests.jobs.noop", queue="q", max_attempts=1))
        async with app.pool.connection() as conn:
            await arun(
                conn,
                store.heartbeat("dead", hostname="h", pid=1, tags=[], queues=["q"], timeout=0.2),
            )
            claimed = await arun(conn, store.fetch_jobs("q", "dead", 10))
            assert {j.id for j in claimed} == {again, last}
        started = time.monotonic()
        async with serving(app):
            done = await app.wait_for_jobs([again, last], timeout=15)
        elapsed = time.monotonic() - started
    by_id = {j.id: j for j in done}
    assert by_id[again].state == "succeeded" and by_id[again].attempts == 2
    assert "WorkerDiedError" in by_id[again].errors[0]["traceback"]
    assert by_id[last].state == "failed" and by_id[last].attempts == 1
    assert "WorkerDiedError" in by_id[last].errors[0]["traceback"]
    assert elapsed < 10


async def test_recovery_leaves_live_workers_alone(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    store = chancy.store
    async with chancy.pool.connection() as conn:
        assert await arun(conn, store.acquire_lease("leader", 30))
        await arun(
            conn, store.heartbeat("alive", hostname="h", pid=1, tags=[], queues=[], timeout=60)
        )
        await arun(conn, store.fetch_jobs("q", "alive", 1))
        assert await arun(conn, store.recover_orphaned_jobs("leader")) == []
    job = await chancy.get_job(ref)
    assert job is not None and job.state == "running"


async def test_only_the_leaseholder_recovers_and_prunes(chancy: Chancy) -> None:
    """A paused ex-leader that still believes it leads must change nothing."""
    await chancy.declare(Queue("q"))
    orphan = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    old = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    store = chancy.store
    template, params = (Age() > 60).to_sql()
    async with chancy.pool.connection() as conn:
        await arun(conn, store.fetch_jobs("q", "gone", 1))  # no heartbeat row: orphaned
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() - interval "
            "'1 hour' WHERE id = %s",
            (old.uuid,),
        )
        assert await arun(conn, store.acquire_lease("current", 30))
        assert await arun(conn, store.recover_orphaned_jobs("stale")) == []
        assert await arun(conn, store.prune_jobs("stale", template, params, 10)) == 0
        await conn.execute("UPDATE chancy_leader SET expires_at = now() - interval '1 second'")
        assert await arun(conn, store.recover_orphaned_jobs("current")) == []  # lease expired
        assert await arun(conn, store.acquire_lease("current", 30))
        assert await arun(conn, store.recover_orphaned_jobs("current")) == [(orphan, "failed")]
        assert await arun(conn, store.prune_jobs("current", template, params, 10)) == 1


async def test_pruner_deletes_only_old_finished_jobs_in_batches(chancy: Chancy) -> None:
    await chancy.declare(Queue("q"))
    await chancy.declare(Queue("keep"))
    refs = {
        state: await chancy.push(Job(func="tests.jobs.noop", queue="q"))
        for state in ("pending", "running", "retrying", "succeeded", "failed", "cancelled")
    }
    kept = await chancy.push(Job(func="tests.jobs.noop", queue="keep"))
    async with chancy.pool.connection() as conn:
        for state, ref in refs.items():
            done = state in ("succeeded", "failed", "cancelled")
            await conn.execute(
                "UPDATE chancy_jobs SET state = %s, taken_by = 'w', created_at = now() - interval"
                " '2 hours', completed_at = CASE WHEN %s THEN now() - interval '2 hours' END"
                " WHERE id = %s",
                (state, done, ref.uuid),
            )
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() - interval '2 hours'"
            " WHERE id = %s",
            (kept.uuid,),
        )
        rule = (Age() > 3600) & (QueueField() == "q")
        template, params = rule.to_sql()
        assert await arun(conn, chancy.store.acquire_lease("me", 30))
        assert await arun(conn, chancy.store.prune_jobs("me", template, params, 2)) == 2
        assert await arun(conn, chancy.store.prune_jobs("me", template, params, 2)) == 1
        assert await arun(conn, chancy.store.prune_jobs("me", template, params, 2)) == 0
    left = {j.state for j in await chancy.get_jobs([*refs.values(), kept])}
    assert left == {"pending", "running", "retrying", "succeeded"}


async def test_pruner_plugin_runs_on_the_leader(dsn: str) -> None:
    async with Chancy(dsn, plugins=fast_plugins()) as app:
        await app.migrate()
        await app.declare(Queue("q"))
        ref = await app.push(Job(func="tests.jobs.noop", queue="q"))
        async with app.pool.connection() as conn:
            await conn.execute(
                "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() - interval "
                "'2 hours' WHERE id = %s",
                (ref.uuid,),
            )
        async with serving(app):
            # Polled: the pruner may act before a hub waiter could be registered.
            await poll(lambda: _gone(app, ref), timeout=10)
        assert await app.get_job(ref) is None


async def _gone(app: Chancy, ref: object) -> bool:
    return await app.get_job(ref) is None  # type: ignore[arg-type]


def test_rules_render_parameters_not_values() -> None:
    rule = ((Age() > 60) & (QueueField() == "x'; DROP TABLE t; --")) | State().in_(["failed"])
    template, params = rule.to_sql()
    rendered = template.as_string(None)
    assert "DROP" not in rendered and "%(rule_" in rendered
    assert "x'; DROP TABLE t; --" in params.values()


def test_retry_delay_is_exponential_capped_with_jitter() -> None:
    plugin = RetryPlugin(backoff_jitter=[0, 0])
    assert [plugin.delay_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert plugin.delay_for(30) == 300
    custom = {"backoff": 3, "backoff_factor": 3, "backoff_limit": 20, "backoff_jitter": [1, 2]}
    delays = [plugin.delay_for(2, custom) for _ in range(50)]
    assert all(10 <= d <= 11 for d in delays) and len(set(delays)) > 1
    assert 20 <= plugin.delay_for(9, custom) <= 22
    with pytest.raises(ConfigurationError):
        RetryPlugin(backof=1)


async def test_retry_plugin_schedules_the_next_attempt(dsn: str) -> None:
    async with Chancy(dsn, plugins=[RetryPlugin()]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
        settings = {
            "backoff": 0.5,
            "backoff_factor": 1,
            "backoff_limit": 1,
            "backoff_jitter": [0, 0],
        }
        async with serving(app):
            ref = await app.push(
                Job(
                    func="tests.jobs.fail_until",
                    queue="q",
                    kwargs={"attempt": 2},
                    max_attempts=3,
                    meta={"retry_settings": settings},
                )
            )
            job = await app.wait_for_job(ref, timeout=15)
    assert job is not None and job.state == "succeeded" and job.attempts == 2
    assert job.started_at is not None and job.created_at is not None
    # The second attempt waited the 0.5 s back-off (database time).
    assert (job.started_at - job.created_at).total_seconds() >= 0.5


async def test_plugins_hooks_can_change_jobs(dsn: str) -> None:
    class Tagger(Plugin):
        async def on_job_starting(self, worker: Worker, job: object) -> object:  # type: ignore[override]
            return job.with_meta({"tagged": True})  # type: ignore[attr-defined]

    async with Chancy(dsn, plugins=[Tagger()]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        async with serving(app):
            ref = await app.push(Job(func="tests.jobs.noop", queue="q"))
            job = await app.wait_for_job(ref, timeout=10)
    assert job is not None and job.meta == {"tagged": True}
