"""Bad input at the edges (issue 4, items 13-15): hostile kwargs, names and function paths.

Every refusal is a typed ``chancy.errors`` exception raised before any SQL runs, so the
caller's own transaction stays usable and nothing is inserted.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from chancy import Chancy, Job, Limit, Queue, Worker
from chancy.errors import (
    ChancyError,
    InvalidNameError,
    JobArgumentsError,
    JobValidationError,
    QueueValidationError,
)
from chancy.store import MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH


class Custom:
    """An object JSON knows nothing about."""


def nested(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth - 1):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


#: (kwargs, the path the error must name)
BAD_KWARGS: list[tuple[str, Callable[[], dict[Any, Any]], str]] = [
    ("set", lambda: {"a": [0, 1, 2, {1, 2}]}, "kwargs['a'][3]"),
    ("bytes", lambda: {"blob": b"\x00\x01"}, "kwargs['blob']"),
    ("decimal", lambda: {"price": {"eur": decimal.Decimal("9.99")}}, "kwargs['price']['eur']"),
    ("datetime", lambda: {"when": dt.datetime(2030, 1, 1, tzinfo=dt.UTC)}, "kwargs['when']"),
    ("custom", lambda: {"a": [{"b": Custom()}]}, "kwargs['a'][0]['b']"),
    ("nan", lambda: {"x": [1.0, math.nan]}, "kwargs['x'][1]"),
    ("inf", lambda: {"x": math.inf}, "kwargs['x']"),
    ("-inf", lambda: {"x": {"y": -math.inf}}, "kwargs['x']['y']"),
    ("nul", lambda: {"s": ["ok", "a\u0000b"]}, "kwargs['s'][1]"),
    ("nul-key", lambda: {"d": {"k\u0000": 1}}, "kwargs['d']['k\\x00']"),
    ("lone-surrogate", lambda: {"s": "x\ud800y"}, "kwargs['s']"),
    ("surrogate-pair", lambda: {"s": "\ud83d\ude00"}, "kwargs['s']"),
    ("low-surrogate-key", lambda: {"d": {"\udc00": 1}}, "kwargs['d']['\\udc00']"),
    ("int-key", lambda: {"d": {1: "one"}}, "kwargs['d'][1]"),
    ("tuple-key", lambda: {"d": {(1, 2): "pair"}}, "kwargs['d'][(1, 2)]"),
    ("none-key", lambda: {"d": [{None: 1}]}, "kwargs['d'][0][None]"),
    ("deep", lambda: {"deep": nested(10_000)}, "kwargs['deep']" + "[0]" * (MAX_PAYLOAD_DEPTH - 1)),
    ("int>2^63", lambda: {"n": [2**63]}, "kwargs['n'][0]"),
    ("int<-2^63", lambda: {"n": -(2**63) - 1}, "kwargs['n']"),
    ("huge-int", lambda: {"n": 10**5000}, "kwargs['n']"),
    ("too-big", lambda: {"blob": "x" * MAX_PAYLOAD_BYTES}, "kwargs"),
]


@pytest.fixture
async def app(chancy: Chancy) -> Chancy:
    await chancy.declare(Queue("default"))
    return chancy


async def count_jobs(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM chancy_jobs")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_bad_kwargs_fail_at_push_naming_the_path(app: Chancy, dsn: str) -> None:
    """Every case in one schema (a schema per case would cost more than the checks)."""
    refs = []
    with app:
        for name, make, path in BAD_KWARGS:
            value = make()
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                async with conn.transaction():
                    # Single push, bulk push and meta: refused before SQL, naming the path.
                    with pytest.raises(JobArgumentsError) as caught:
                        await app.push_ex(conn, Job(func="tests.jobs.echo", kwargs=value))
                    assert caught.value.path == path, name
                    assert path in str(caught.value), name
                    assert "tests.jobs.echo" in str(caught.value), name
                    with pytest.raises(JobArgumentsError) as caught:
                        await app.push_many_ex(
                            conn,
                            [
                                Job(func="tests.jobs.noop"),
                                Job(func="tests.jobs.echo", kwargs=value),
                            ],
                        )
                    assert caught.value.path == path, name
                    meta_path = "meta" + path.removeprefix("kwargs")
                    with pytest.raises(JobArgumentsError) as caught:
                        await app.push_ex(conn, Job(func="tests.jobs.noop", meta=value))
                    assert caught.value.path == meta_path, name
                    # The caller's transaction is still usable.
                    refs.append(await app.push_ex(conn, Job(func="tests.jobs.noop")))
            # The pooled and sync paths refuse it the same way.
            with pytest.raises(JobArgumentsError):
                await app.push(Job(func="tests.jobs.echo", kwargs=value))
            with pytest.raises(JobArgumentsError):
                app.sync_push(Job(func="tests.jobs.echo", kwargs=value))
    # Only the good pushes, one per case, were inserted.
    assert {j.id for j in await app.get_jobs(refs)} == set(refs)
    assert await count_jobs(dsn) == len(BAD_KWARGS)


async def test_values_at_the_limits_round_trip_exactly(app: Chancy) -> None:
    kwargs = {
        "max": 2**63 - 1,
        "min": -(2**63),
        "float": 0.1,
        "tiny": 5e-324,
        "emoji": "\U0001f600 ok",
        "quote": "'; DROP TABLE chancy_jobs; --",
        "escape": "\\u0000 is text here",
        "deep": nested(MAX_PAYLOAD_DEPTH - 1),  # the kwargs dict is level 1
        "tuple": (1, 2),
    }
    big = {"blob": "x" * (MAX_PAYLOAD_BYTES - 20)}
    refs = [
        await app.push(Job(func="tests.jobs.echo", kwargs=kwargs)),
        await app.push(Job(func="tests.jobs.echo", kwargs=big)),
    ]
    stored = {j.id: j for j in await app.get_jobs(refs)}
    expected = json.loads(json.dumps(kwargs))  # tuples become lists, as documented
    assert stored[refs[0]].kwargs == expected
    assert stored[refs[1]].kwargs == big


async def test_notify_never_carries_kwargs_or_meta(app: Chancy, dsn: str) -> None:
    secret = "s3cr3t-payload"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(app.store.channel)))
        await app.push(Job(func="tests.jobs.echo", kwargs={"k": secret}, meta={"m": secret}))
        refs = [
            r
            async for batch in app.push_many(
                [Job(func="tests.jobs.echo", kwargs={"k": secret, "i": i}) for i in range(3)]
            )
            for r in batch
        ]
        await app.cancel_job(refs[0])
        payloads = []
        async for notify in listener.notifies(timeout=1.0):
            payloads.append(notify.payload)
    assert len(payloads) >= 2
    for payload in payloads:
        assert secret not in payload
        assert set(json.loads(payload)) <= {"e", "q", "j", "w"}


# -- names and other fields (item 14) --------------------------------------------------

BAD_NAMES = [
    "",
    "x" * 10_000,
    "a\x00b",
    "q'; DROP TABLE chancy_jobs; --",
    'q"',
    "q%",
    "%",
    "_",
    "q\U0001f600",
    " q",
    "q\n",
    "q\r\n",
    "\nq",
    "../q",
    "q;",
    "\u00e9t\u00e9",
]


async def test_bad_queue_names_are_refused_everywhere(app: Chancy, dsn: str) -> None:
    for name in BAD_NAMES:
        with pytest.raises(InvalidNameError):
            Queue(name)
        with pytest.raises(InvalidNameError):
            Job(func="tests.jobs.noop", queue=name)
        for call in (
            app.get_queue,
            app.delete_queue,
            app.pause_queue,
            app.resume_queue,
            lambda queue: app.push(queue, Job(func="tests.jobs.noop")),
        ):
            with pytest.raises(InvalidNameError):
                await call(name)
    await assert_schema_intact(app, dsn)


async def assert_schema_intact(app: Chancy, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name LIKE 'chancy\\_%%'"
        )
        row = await cur.fetchone()
        assert row is not None and row[0] >= 5
    assert await app.is_up_to_date()
    assert [q.name for q in await app.get_all_queues()] == ["default"]


async def test_like_wildcards_in_names_never_match_other_queues(chancy: Chancy) -> None:
    """``_`` is a legal name character and ``.`` too; neither may act as a pattern."""
    names = ["a_c", "abc", "a.c", "axc", "a-c"]
    for name in names:
        await chancy.declare(Queue(name, executor=Chancy.Executor.Async, polling_interval=0.1))
    refs = {name: await chancy.push(Job(func="tests.jobs.noop", queue=name)) for name in names}
    assert (await chancy.get_queue("a_c") or Queue("z")).name == "a_c"
    async with Worker(chancy, queues=["a_c", "a.c"], register_signal_handlers=False):
        done = await chancy.wait_for_jobs([refs["a_c"], refs["a.c"]], timeout=10)
        assert {j.state for j in done} == {"succeeded"}
    others = await chancy.get_jobs([refs[n] for n in ("abc", "axc", "a-c")])
    assert [(j.state, j.attempts) for j in others] == [("pending", 0)] * 3
    # Deleting one never deletes a look-alike.
    assert await chancy.delete_queue("a_c")
    assert sorted(q.name for q in await chancy.get_all_queues()) == sorted(set(names) - {"a_c"})
    assert len(await chancy.get_jobs(list(refs.values()))) == len(names) - 1


async def test_names_at_the_limits_are_stored_verbatim(chancy: Chancy) -> None:
    names = ["Q", "0", "x" * 100, "a.b-c_d", "A" + "_" * 99]
    for name in names:
        stored = await chancy.declare(Queue(name))
        assert stored.name == name
    assert sorted(q.name for q in await chancy.get_all_queues()) == sorted(names)
    with pytest.raises(InvalidNameError):
        Queue("x" * 101)
    key = "'; DROP TABLE chancy_jobs; -- %_ \U0001f600"
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="Q", unique_key=key))
    stored_job = await chancy.get_job(ref)
    assert stored_job is not None and stored_job.unique_key == key


BAD_FIELDS: list[tuple[str, Callable[[], object], type[ChancyError]]] = [
    ("func-newline", lambda: Job(func="tests.jobs.noop\n"), InvalidNameError),
    ("func-sql", lambda: Job(func="m.f'; DROP TABLE x; --"), InvalidNameError),
    ("func-empty", lambda: Job(func=""), InvalidNameError),
    ("prefix-newline", lambda: Chancy("", prefix="chancy_\n"), InvalidNameError),
    ("prefix-quote", lambda: Chancy("", prefix='x"; DROP'), InvalidNameError),
    ("priority>smallint", lambda: Job(func="m.f", priority=2**15), JobValidationError),
    ("priority<smallint", lambda: Job(func="m.f", priority=-(2**15) - 1), JobValidationError),
    ("priority-str", lambda: Job(func="m.f", priority="1"), JobValidationError),  # type: ignore[arg-type]
    ("attempts>int32", lambda: Job(func="m.f", max_attempts=2**31), JobValidationError),
    ("attempts-0", lambda: Job(func="m.f", max_attempts=0), JobValidationError),
    ("attempts-float", lambda: Job(func="m.f", max_attempts=1.0), JobValidationError),  # type: ignore[arg-type]
    ("time-limit-0", lambda: Limit(Limit.Type.TIME, 0), JobValidationError),
    ("time-limit-nan", lambda: Limit(Limit.Type.TIME, math.nan), JobValidationError),
    ("memory-limit-neg", lambda: Limit(Limit.Type.MEMORY, -1), JobValidationError),
    ("limit-type", lambda: Limit("cpu", 1), JobValidationError),
    ("concurrency-0", lambda: Queue("q", concurrency=0), QueueValidationError),
    ("concurrency>int32", lambda: Queue("q", concurrency=2**31), QueueValidationError),
    ("polling-0", lambda: Queue("q", polling_interval=0), QueueValidationError),
    ("polling-nan", lambda: Queue("q", polling_interval=math.nan), QueueValidationError),
    ("polling-inf", lambda: Queue("q", polling_interval=math.inf), QueueValidationError),
    (
        "rate-limit>int32",
        lambda: Queue("q", rate_limit=2**31, rate_limit_window=1),
        QueueValidationError,
    ),
    ("tag-regex", lambda: Queue("q", tags={"("}), QueueValidationError),
    ("executor-options", lambda: Queue("q", executor_options={"x": {1}}), QueueValidationError),
    ("unique-key-long", lambda: Job(func="m.f", unique_key="k" * 1025), JobValidationError),
]


@pytest.mark.parametrize(
    ("make", "error"), [(m, e) for _, m, e in BAD_FIELDS], ids=[n for n, _, _ in BAD_FIELDS]
)
def test_out_of_range_fields_are_refused_before_sql(
    make: Callable[[], object], error: type[ChancyError]
) -> None:
    with pytest.raises(error):
        make()


# -- function paths (item 15) -----------------------------------------------------------

BROKEN_FUNCS = [
    ("no.such.module.func", "no.such"),
    ("tests.jobs.no_such_function", "no_such_function"),
    ("tests.rel_jobs.NOT_CALLABLE", "not callable"),
    ("tests.rel_broken_import.func", "rel_broken_import"),
]
EXECUTORS = [Chancy.Executor.Async, Chancy.Executor.Threaded, Chancy.Executor.Process]


@pytest.mark.parametrize("executor", EXECUTORS, ids=["async", "threaded", "process"])
async def test_unimportable_functions_fail_clearly_and_the_worker_survives(
    chancy: Chancy, executor: str
) -> None:
    await chancy.declare(Queue("q", executor=executor, concurrency=2, polling_interval=0.1))
    async with Worker(chancy, register_signal_handlers=False) as worker:
        broken = [
            await chancy.push(Job(func=func, queue="q", max_attempts=2)) for func, _ in BROKEN_FUNCS
        ]
        jobs = {j.id: j for j in await chancy.wait_for_jobs(broken, timeout=30)}
        after = await chancy.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": 1, "b": 2}))
        done = await chancy.wait_for_job(after, timeout=15)
        assert not worker.stopping.is_set()
    assert done is not None and (done.state, done.result) == ("succeeded", 3)
    for ref, (_func, words) in zip(broken, BROKEN_FUNCS, strict=True):
        job = jobs[ref]
        assert (job.state, job.attempts) == ("failed", 2), job
        assert len(job.errors) == 2
        last = job.errors[-1]["traceback"]
        assert words in last, last
        assert "JobImportError" in last, last
