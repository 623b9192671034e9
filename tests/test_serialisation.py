"""Pluggable JSON (orjson when installed) and push-time checks of a @job's kwargs."""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import uuid
from typing import Any

import psycopg
import pytest

from chancy import Chancy, Job, Queue
from chancy.errors import ConfigurationError, JobArgumentsError
from chancy.store import _orjson_dumps, _orjson_loads, _stdlib_dumps, default_json, dumps
from tests import jobs_jobs
from tests.test_worker import serving


def test_orjson_is_the_default_when_installed() -> None:
    encode, decode = default_json()
    assert encode is _orjson_dumps and decode is _orjson_loads
    assert decode(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}


async def test_rows_orjson_cannot_decode_are_still_read(chancy: Chancy) -> None:
    # Written by another client: a number beyond a double's range, which jsonb stores.
    await chancy.declare(Queue("q"))
    ref = await chancy.push(Job(func="tests.jobs.noop", queue="q"))
    async with chancy.pool.connection() as conn:
        await conn.execute(
            psycopg.sql.SQL("UPDATE {} SET kwargs = %s::jsonb WHERE id = %s").format(
                chancy.store.table("jobs")
            ),
            ('{"n": 1e400}', ref.uuid),
        )
    job = await chancy.get_job(ref)
    # jsonb keeps all 401 digits; orjson refuses them, the standard library reads them.
    assert job is not None and job.kwargs == {"n": 10**400}


@pytest.mark.parametrize("encoder", [_stdlib_dumps, _orjson_dumps])
@pytest.mark.parametrize(
    "value",
    [
        {"x": float("nan")},
        {"x": [1, float("inf")]},
        {"when": dt.datetime(2030, 1, 1)},
        {"x": object()},
    ],
)
def test_both_encoders_refuse_what_json_cannot_hold(encoder: Any, value: Any) -> None:
    with pytest.raises(JobArgumentsError, match="kwargs of f"):
        dumps(value, "kwargs of f", encoder)


@pytest.mark.parametrize("encoder", [_stdlib_dumps, _orjson_dumps])
def test_both_encoders_agree_on_plain_json(encoder: Any) -> None:
    value = {"a": [1, 2.5, None, True, "é\u2028"], "b": {"c": None}}
    assert json.loads(dumps(value, "x", encoder)) == value
    # JSON would turn the key 1 into "1" silently: both encoders refuse it, naming it.
    with pytest.raises(JobArgumentsError, match=r"x\['m'\]\[1\]"):
        dumps({"m": {1: "a"}}, "x", encoder)


async def test_custom_json_hooks_are_used_for_kwargs_and_decoding(dsn: str) -> None:
    when = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    app = Chancy(
        dsn,
        json_dumps=functools.partial(json.dumps, default=str),
        json_loads=functools.partial(json.loads, parse_float=decimal.Decimal),
    )
    async with app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        ref = await app.push(
            Job(
                func="tests.jobs_jobs.kwarg_types",
                queue="q",
                kwargs={"when": when, "id": uuid.UUID(int=1), "price": 1.1},
            )
        )
        stored = await app.get_job(ref)
        assert stored is not None
        assert stored.kwargs == {
            "when": str(when),
            "id": str(uuid.UUID(int=1)),
            "price": decimal.Decimal("1.1"),
        }
        async with serving(app):
            # The worker decoded the kwargs with the same hook.
            result = await app.get_result(ref, wait=True, timeout=20)
        assert result == {"when": "str", "id": "str", "price": "Decimal"}
    with app:
        job = app.sync_get_job(ref)
    assert job is not None and job.kwargs["price"] == decimal.Decimal("1.1")


async def test_job_kwargs_are_checked_against_the_signature_at_push(chancy: Chancy) -> None:
    await chancy.declare(Queue("checked"))
    with pytest.raises(JobArgumentsError, match=r"unexpected keyword argument\(s\): c"):
        await chancy.push(jobs_jobs.checked.job.with_kwargs(a=1, c=3))
    with pytest.raises(JobArgumentsError, match=r"missing required keyword argument\(s\): a"):
        await chancy.push(jobs_jobs.checked.job.with_kwargs(b=1))
    with pytest.raises(JobArgumentsError, match="missing"):
        await chancy.push(Job(func="tests.jobs_jobs.checked", queue="checked"))
    # The injected QueuedJob parameter is neither required nor accepted from the caller.
    with pytest.raises(JobArgumentsError, match="unexpected"):
        await chancy.push(jobs_jobs.checked.job.with_kwargs(a=1, job=None))
    assert await chancy.push(jobs_jobs.checked.job.with_kwargs(a=1))
    assert await chancy.push(jobs_jobs.checked_any.job.with_kwargs(a=1, anything=2))
    # Plain functions and functions whose module is not imported here are not checked.
    assert await chancy.push(Job(func="tests.jobs_jobs.unchecked", queue="checked"))
    assert await chancy.push(Job(func="not_imported_anywhere.func", queue="checked"))
    refs = [
        r
        async for batch in chancy.push_many(
            [jobs_jobs.checked.job.with_kwargs(a=i) for i in range(3)]
        )
        for r in batch
    ]
    assert len(refs) == 3
    with pytest.raises(JobArgumentsError):
        async for _ in chancy.push_many([jobs_jobs.checked.job.with_kwargs(a=1, z=0)]):
            pass


async def test_argument_errors_leave_the_callers_transaction_usable(
    chancy: Chancy, dsn: str
) -> None:
    await chancy.declare(Queue("checked"))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            await conn.execute("CREATE TABLE t (id int)")
            with pytest.raises(JobArgumentsError):
                await chancy.push_ex(conn, jobs_jobs.checked.job.with_kwargs(nope=1))
            await conn.execute("INSERT INTO t VALUES (1)")
            ref = await chancy.push_ex(conn, jobs_jobs.checked.job.with_kwargs(a=2))
        cur = await conn.execute("SELECT count(*) FROM t")
        assert await cur.fetchone() == (1,)
    job = await chancy.get_job(ref)
    assert job is not None and job.kwargs == {"a": 2}


async def test_kwarg_types_are_checked_as_the_job_receives_them(dsn: str) -> None:
    app = Chancy(
        dsn, validate_kwarg_types=True, json_dumps=functools.partial(json.dumps, default=str)
    )
    async with app:
        await app.migrate()
        await app.declare(Queue("checked"))
        typed = jobs_jobs.typed.job
        assert await app.push(typed.with_kwargs(count=3, names=["a"], ratio=2))
        with pytest.raises(JobArgumentsError, match=r"argument count \('3' as the job"):
            await app.push(typed.with_kwargs(count="3", names=[]))
        with pytest.raises(JobArgumentsError, match=r"argument names\[1\]"):
            await app.push(typed.with_kwargs(count=1, names=["a", 2]))
        # A datetime reaches the job as a string, however it is passed: refused, although
        # this app's encoder accepts it.
        when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        for value in (when, when.isoformat()):
            with pytest.raises(JobArgumentsError, match=r"argument when .* valid datetime"):
                await app.push(jobs_jobs.typed_when.job.with_kwargs(when=value))
    # Off by default: only names are checked.
    async with Chancy(dsn) as lenient:
        assert await lenient.push(jobs_jobs.typed.job.with_kwargs(count="3", names=[]))


def test_kwarg_type_checks_need_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pydantic", None)
    with pytest.raises(ConfigurationError, match=r"chancy\[pydantic\]"):
        Chancy("dbname=test", validate_kwarg_types=True)
