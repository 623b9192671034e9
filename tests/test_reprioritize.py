"""The Reprioritize plugin: which jobs it raises, by how much, and only once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from chancy import Chancy, Job, Queue, Reference
from chancy.errors import ConfigurationError
from chancy.plugins.leadership import Leadership
from chancy.plugins.reprioritize import Reprioritize
from chancy.rule import Age, Condition
from chancy.rule import Queue as QueueField
from chancy.store import arun
from chancy.store.reprioritize import reprioritize_jobs
from tests.test_worker import poll, serving


async def put(app: Chancy, *, priority: int = 0, queue: str = "q", age: int = 7200) -> Reference:
    """A pending job created ``age`` seconds ago (and not due for an hour, so no worker
    takes it)."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    ref = await app.push(
        Job(func="tests.jobs.noop", queue=queue, priority=priority, scheduled_at=later)
    )
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET created_at = now() - make_interval(secs => %s) WHERE id = %s",
            (age, ref.uuid),
        )
    return ref


async def set_state(app: Chancy, ref: Reference, state: str) -> None:
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET state = %s, taken_by = 'w',"
            " completed_at = CASE WHEN %s IN ('succeeded', 'failed', 'cancelled') THEN now() END"
            " WHERE id = %s",
            (state, state, ref.uuid),
        )


async def boost(
    app: Chancy, rule: Condition, *, increase: int = 1, limit: int = 1000, leader: str = "me"
) -> dict[Reference, int]:
    template, params = rule.to_sql()
    async with app.pool.connection() as conn:
        await arun(conn, app.store.acquire_lease("me", 30))
        op = reprioritize_jobs(app.store, leader, template, params, increase=increase, limit=limit)
        return await arun(conn, op)


async def priorities(app: Chancy, refs: list[Reference]) -> list[int]:
    jobs = {j.id: j for j in await app.get_jobs(refs)}
    return [jobs[r].priority for r in refs]


@pytest.fixture
async def app(chancy: Chancy) -> Chancy:
    await chancy.declare(Queue("q"))
    await chancy.declare(Queue("other"))
    return chancy


async def test_only_live_matching_jobs_are_raised_and_only_once(app: Chancy) -> None:
    old, young, other_queue, retrying = (
        await put(app, priority=2),
        await put(app, age=10),
        await put(app, queue="other"),
        await put(app, priority=-1),
    )
    finished, running = await put(app), await put(app)
    await set_state(app, retrying, "retrying")
    await set_state(app, finished, "succeeded")
    await set_state(app, running, "running")
    rule = (Age() > 600) & (QueueField() == "q")
    changed = await boost(app, rule, increase=5)
    assert changed == {old: 7, retrying: 4}
    refs = [old, young, other_queue, retrying, finished, running]
    assert await priorities(app, refs) == [7, 0, 0, 4, 0, 0]
    # Later passes find nothing new: a job that keeps matching is not raised again.
    for _ in range(3):
        assert await boost(app, rule, increase=5) == {}
    assert await priorities(app, refs) == [7, 0, 0, 4, 0, 0]
    [job] = await app.get_jobs([old])
    assert job.meta["reprioritized_from"] == 2 and "reprioritized_at" in job.meta
    # A job that starts matching later is raised then.
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET created_at = now() - interval '1 hour' WHERE id = %s",
            (young.uuid,),
        )
    assert await boost(app, rule, increase=5) == {young: 5}


async def test_batches_are_bounded_and_priorities_clamped(app: Chancy) -> None:
    refs = [await put(app, priority=32760) for _ in range(5)]
    sizes = [len(await boost(app, Age() > 600, increase=100, limit=2)) for _ in range(4)]
    assert sizes == [2, 2, 1, 0]
    assert await priorities(app, refs) == [32767] * 5
    low = await put(app, priority=-32760)
    assert await boost(app, Age() > 600, increase=-100) == {low: -32768}


async def test_only_the_leaseholder_reprioritizes(app: Chancy) -> None:
    ref = await put(app)
    assert await boost(app, Age() > 600, leader="stale") == {}
    assert await boost(app, Age() > 600, leader="me") == {ref: 1}


class CountingReprioritize(Reprioritize):
    """Counts finished passes, so a test can wait for more of them."""

    passes = 0

    async def reprioritize(self, worker: Any, chancy: Chancy) -> int:
        changed = await super().reprioritize(worker, chancy)
        self.passes += 1
        return changed


async def test_the_plugin_runs_on_the_leader(dsn: str) -> None:
    plugin = CountingReprioritize(
        Age() > 600, check_interval=0.05, priority_increase=3, batch_size=2
    )
    plugins = [Leadership(poll_interval=0.1, timeout=1), plugin]
    async with Chancy(dsn, plugins=plugins) as app:
        await app.migrate()
        await app.declare(Queue("q"))
        refs = [await put(app) for _ in range(5)]
        fresh = await put(app, age=0)
        async with serving(app):

            async def all_raised() -> bool:
                return await priorities(app, refs) == [3] * 5

            await poll(all_raised, timeout=15)
            # Several more passes run; none raises a job a second time.
            seen = plugin.passes
            await poll(lambda: plugin.passes >= seen + 3, timeout=15)
        assert await priorities(app, [*refs, fresh]) == [3, 3, 3, 3, 3, 0]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Reprioritize("age > 600"),  # type: ignore[arg-type]
        lambda: Reprioritize(Age() > 1, check_interval=0),
        lambda: Reprioritize(Age() > 1, priority_increase=0),
        lambda: Reprioritize(Age() > 1, priority_increase=True),
        lambda: Reprioritize(Age() > 1, priority_increase=1.5),  # type: ignore[arg-type]
        lambda: Reprioritize(Age() > 1, batch_size=0),
    ],
)
def test_settings_are_validated(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


def test_rules_are_exposed_on_the_plugin() -> None:
    assert Reprioritize.Rules.Age is Age
