"""The rule language: what each rule matches in the database, how it renders, and that
an Age rule can be served by the index on completed_at."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from psycopg import sql

from chancy import Chancy, Job, Queue, Reference
from chancy.errors import ConfigurationError
from chancy.rule import ID, Age, Condition, CreatedAt, Rules, ScheduledAt, State
from chancy.rule import Job as JobField
from chancy.rule import Queue as QueueField
from chancy.store import _query_texts, arun, compose


async def matching(app: Chancy, rule: Condition) -> set[str]:
    """The unique keys of the jobs ``rule`` selects."""
    template, params = rule.to_sql()
    query = sql.SQL("SELECT unique_key FROM chancy_jobs WHERE {} ORDER BY 1").format(template)
    async with app.pool.connection() as conn:
        cur = await conn.execute(query, params)
        return {row[0] for row in await cur.fetchall()}


async def put(app: Chancy, key: str, *, queue: str = "q", func: str = "tests.jobs.noop") -> Any:
    return await app.push(Job(func=func, queue=queue, unique_key=key))


@pytest.fixture
async def app(dsn: str) -> Any:
    async with Chancy(dsn, require_declared_queues=False) as chancy:
        await chancy.migrate()
        yield chancy


async def test_age_uses_completion_time_for_finished_and_creation_time_for_live_jobs(
    app: Chancy,
) -> None:
    for key in ("old_done", "young_done", "old_live", "young_live"):
        await put(app, key)
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET created_at = now() - interval '3 hours'"
            " WHERE unique_key IN ('old_done', 'young_done', 'old_live')"
        )
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() - CASE"
            " WHEN unique_key = 'old_done' THEN interval '2 hours' ELSE interval '1 minute' END"
            " WHERE unique_key IN ('old_done', 'young_done')"
        )
    assert await matching(app, Age() > 3600) == {"old_done", "old_live"}
    assert await matching(app, Age() >= dt.timedelta(hours=1)) == {"old_done", "old_live"}
    assert await matching(app, Age() < 3600) == {"young_done", "young_live"}
    assert await matching(app, Age() <= 60.5) == {"young_done", "young_live"}
    assert await matching(app, Age() > 2.5 * 3600) == {"old_live"}
    everything = {"old_done", "young_done", "old_live", "young_live"}
    assert await matching(app, Age() != 10**6) == everything
    assert await matching(app, ~(Age() > 3600)) == {"young_done", "young_live"}


async def test_text_rules_are_literal_equality_not_patterns(app: Chancy) -> None:
    await put(app, "underscore", queue="a_b")
    await put(app, "plain", queue="axb")
    await put(app, "percent_func", func="tests.jobs.a_b")
    assert await matching(app, QueueField() == "a_b") == {"underscore"}
    assert await matching(app, QueueField() == "a%") == set()
    assert await matching(app, QueueField() == "a_%") == set()
    assert await matching(app, QueueField() != "a_b") == {"plain", "percent_func"}
    assert await matching(app, JobField() == "tests.jobs.a_b") == {"percent_func"}
    assert await matching(app, JobField() == "tests.jobs.a%") == set()
    assert await matching(app, QueueField().in_(["a_b", "q"])) == {"underscore", "percent_func"}
    assert await matching(app, QueueField().not_in(["a_b", "q"])) == {"plain"}


async def test_state_time_and_id_rules(app: Chancy) -> None:
    first = await put(app, "first")
    second = await put(app, "second")
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'failed', completed_at = now(),"
            " scheduled_at = now() - interval '1 day' WHERE unique_key = 'first'"
        )
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
        assert row is not None
        now: dt.datetime = row[0]
    assert await matching(app, State() == "failed") == {"first"}
    assert await matching(app, State().in_(["pending", "retrying"])) == {"second"}
    assert await matching(app, ScheduledAt() < now - dt.timedelta(hours=1)) == {"first"}
    assert await matching(app, CreatedAt() <= now) == {"first", "second"}
    assert await matching(app, ID() == first) == {"first"}
    assert await matching(app, ID() == str(second)) == {"second"}
    assert await matching(app, ID().in_([first.uuid, second])) == {"first", "second"}
    assert await matching(app, ID() > first) == {"second"}  # ids are time-ordered
    either = (State() == "failed") | ((QueueField() == "q") & (ID() == second))
    assert await matching(app, either) == {"first", "second"}


def test_rules_render_parameters_and_combine() -> None:
    hostile = "x'; DROP TABLE t; --"
    rule = ((Age() > 60) & (QueueField() == hostile)) | ~State().in_(["failed"])
    template, params = rule.to_sql()
    rendered = template.as_string(None)
    assert "DROP" not in rendered and hostile in params.values()
    assert " AND " in rendered and " OR " in rendered and "IS NOT TRUE" in rendered
    assert "LIKE" not in rendered.upper()
    # Age compares the columns with a bound, not arithmetic over them (index-friendly).
    age, _ = (Age() > 60).to_sql()
    assert "completed_at < (now() - make_interval" in age.as_string(None)
    assert Rules.Age is Age and Rules.Queue is QueueField and Rules.Job is JobField


@pytest.mark.parametrize(
    "build",
    [
        lambda: Age() > "60",
        lambda: Age() > float("nan"),
        lambda: Age() > True,
        lambda: Age().in_([1, 2]),
        lambda: QueueField() == 3,
        lambda: QueueField() > "a",
        lambda: QueueField().in_("abc"),
        lambda: State() == "sleeping",
        lambda: CreatedAt() > dt.datetime(2020, 1, 1),
        lambda: ScheduledAt() < "2020-01-01",
        lambda: ID() == "not-a-uuid",
        lambda: ID() == 5,
        lambda: bool(Age() > 1),
        lambda: (Age() > 1) and (Age() < 5),
    ],
)
def test_bad_rule_values_fail_when_the_rule_is_built(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


async def test_the_pruner_can_serve_an_age_rule_from_the_completed_at_index(
    app: Chancy,
) -> None:
    # 20 000 finished jobs, one per second of age: an hour-old bound selects few of them.
    async with app.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO chancy_jobs (id, queue, func, state, created_at, completed_at)"
            " SELECT gen_random_uuid(), 'q', 'tests.jobs.noop', 'succeeded',"
            " now() - g * interval '1 second', now() - g * interval '1 second'"
            " FROM generate_series(1, 20000) AS g"
        )
        await conn.execute("ANALYZE chancy_jobs")
        await conn.execute("SET enable_seqscan = off")
        for rule in (Age() > 19_000, (Age() > 19_000) & (QueueField() == "q")):
            template, params = rule.to_sql()
            query = compose(_query_texts()["prune_jobs_many"], app.store.prefix, rule=template)
            cur = await conn.execute(
                sql.SQL("EXPLAIN ") + query, {**params, "limit": 100, "leader": "me"}
            )
            plan = "\n".join(row[0] for row in await cur.fetchall())
            assert "chancy_jobs_finished_idx" in plan, plan
            assert "Index Cond: (completed_at < (now() -" in plan, plan
        await conn.execute("RESET enable_seqscan")
        assert await arun(conn, app.store.acquire_lease("me", 30))
        template, params = (Age() > 19_000).to_sql()
        deleted = await arun(conn, app.store.prune_jobs("me", template, params, 5000))
    assert 1000 <= deleted < 1100  # ages grow while the test runs


async def test_an_id_rule_accepts_references(app: Chancy) -> None:
    await app.declare(Queue("q"))
    ref = await put(app, "one")
    assert isinstance(ref, Reference)
    assert await matching(app, ID().not_in([uuid.uuid4()])) == {"one"}
