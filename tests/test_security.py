"""Security (issue 4, items 16-17): no code execution from data, least privilege.

The package is scanned as source (AST), so a new ``import pickle`` or ``eval(...)``
anywhere in ``chancy/`` fails here. Least privilege: the schema's owner migrates; a role
with nothing but DML rights on the tables runs everything else, and a DDL attempt by it
fails with a message that says to migrate as the owner.
"""

from __future__ import annotations

import ast
import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chancy import Chancy, Job, Queue, Worker
from chancy.errors import MigrationPermissionError
from chancy.plugins.leadership import Leadership
from chancy.plugins.pruner import Pruner
from chancy.plugins.recovery import Recovery

PACKAGE = Path(__file__).resolve().parent.parent / "chancy"

#: Modules that turn bytes into objects (or code) and must never see job data.
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
#: Builtins that run code from strings.
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
#: Methods of multiprocessing connections and queues that pickle (``send_bytes`` and
#: ``recv_bytes`` carry raw bytes and are fine). Generators' ``send`` is told apart by the
#: receiver's name.
PICKLING_METHODS = {"send", "recv", "put", "get"}
PICKLING_RECEIVER = re.compile(r"(conn|connection|pipe)$|^\w*_?queue$")
#: CPython 3.13's cross-interpreter queues share str/bytes/int/tuple values natively, without
#: pickling; the sub-interpreter executor passes JSON text through them.
NOT_PICKLING = {"_interpqueues"}


def python_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the scan must see the whole package"
    return files


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in FORBIDDEN_MODULES:
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            if module == "multiprocessing" and any(
                a.name in {"Queue", "SimpleQueue", "Manager"} for a in node.names
            ):
                found.append(f"{where}:{node.lineno}: multiprocessing queues pickle")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where}:{node.lineno}: {func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else None
                if func.attr in FORBIDDEN_CALLS and owner_name == "builtins":
                    found.append(f"{where}:{node.lineno}: builtins.{func.attr}()")
                receiver = ast.unparse(owner).lower()
                if (
                    func.attr in PICKLING_METHODS
                    and receiver not in NOT_PICKLING
                    and PICKLING_RECEIVER.search(receiver.rsplit(".", 1)[-1])
                ):
                    found.append(f"{where}:{node.lineno}: {receiver}.{func.attr}() pickles")
                if func.attr in {"Queue", "SimpleQueue", "Manager"} and owner_name in {
                    "multiprocessing",
                    "_context",
                    "context",
                }:
                    found.append(f"{where}:{node.lineno}: multiprocessing.{func.attr}() pickles")
                if func.attr == "load" and owner_name == "yaml":
                    found.append(f"{where}:{node.lineno}: yaml.load()")
        elif isinstance(node, ast.Attribute) and node.attr in {"loads", "load"}:
            if isinstance(node.value, ast.Name) and node.value.id in FORBIDDEN_MODULES:
                found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_code_execution_from_data_in_the_package() -> None:
    found = [v for path in python_files() for v in violations(path)]
    assert found == []


def test_the_scan_catches_what_it_looks_for(tmp_path: Path) -> None:
    """The scanner itself can fail: each forbidden form is reported."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle\nfrom marshal import loads\nimport shelve as s\n"
        "eval('1')\nexec('x=1')\nconn.recv()\nmultiprocessing.Queue()\n"
        "import builtins\nbuiltins.eval('2')\n"
    )
    found = violations(bad)
    assert len(found) == 8, found


# -- least privilege (item 17) ---------------------------------------------------------


@pytest.fixture
def dml_role(dsn: str) -> Iterator[str]:
    """A LOGIN role created for this test; dropped afterwards."""
    role = f"rel_dml_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def as_role(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    return make_conninfo("", **params)


def fast_plugins() -> list[object]:
    return [
        Leadership(poll_interval=0.2, timeout=1),
        Recovery(poll_interval=0.2),
        Pruner(Pruner.Rules.Age() > 0, poll_interval=0.2),
    ]


@pytest.fixture
async def owner_app(dsn: str) -> AsyncIterator[Chancy]:
    app = Chancy(dsn, plugins=fast_plugins())  # type: ignore[arg-type]
    async with app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async, polling_interval=0.1))
        yield app


def grant_dml(dsn: str, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("SELECT current_schema()")
        row = cur.fetchone()
        assert row is not None
        schema = sql.Identifier(row[0])
        who = sql.Identifier(role)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, who))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                schema, who
            )
        )


async def test_dml_only_role_runs_everything_but_migrations(
    owner_app: Chancy, dsn: str, dml_role: str
) -> None:
    grant_dml(dsn, dml_role)
    app = Chancy(as_role(dsn, dml_role), plugins=fast_plugins())  # type: ignore[arg-type]
    async with app:
        assert await app.is_up_to_date()
        # Push (single, bulk, transactional), read, declare and control queues.
        ref = await app.push(Job(func="tests.jobs.add", queue="q", kwargs={"a": 1, "b": 2}))
        refs = [
            r
            async for batch in app.push_many([Job(func="tests.jobs.noop", queue="q")] * 3)
            for r in batch
        ]
        await app.declare(Queue("other", executor=Chancy.Executor.Async))
        await app.pause_queue("other")
        await app.resume_queue("other")
        # A dead worker's running job, for Recovery to take back.
        orphan = uuid.uuid4()
        async with owner_app.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO chancy_jobs (id, queue, func, state, attempts, max_attempts, "
                "taken_by, started_at) VALUES (%s, 'q', 'tests.jobs.noop', 'running', 1, 2, "
                "'dead-worker', now())",
                (orphan,),
            )
        async with Worker(
            app, register_signal_handlers=False, heartbeat_poll_interval=0.2, heartbeat_timeout=1
        ) as worker:
            await asyncio.wait_for(worker.is_leader.wait(), 10)
            done = await app.wait_for_jobs([ref, *refs, orphan], timeout=20)
            assert {j.state for j in done} == {"succeeded"}
            recovered = await app.get_job(orphan)
            assert recovered is not None and recovered.attempts == 2
            assert "WorkerDiedError" in recovered.errors[0]["traceback"]

            async def pruned() -> bool:
                return not await app.get_jobs([ref, *refs, orphan])

            deadline = asyncio.get_running_loop().time() + 10
            while not await pruned():
                assert asyncio.get_running_loop().time() < deadline, "nothing pruned"
                await asyncio.sleep(0.05)
            workers = await app.get_all_workers()
            assert [w["is_leader"] for w in workers] == [True]
        assert await app.cancel_job(await app.push(Job(func="tests.jobs.noop", queue="other")))
        assert await app.delete_queue("other")

        # DDL fails with a typed error that says what to do; nothing changed.
        for attempt in (app.migrate(), app.migrate(to_version=1)):
            with pytest.raises(MigrationPermissionError, match="as the owner"):
                await attempt
    with app, pytest.raises(MigrationPermissionError, match="as the owner"):
        app.sync_migrate()
    assert await owner_app.is_up_to_date()


async def test_migrations_pending_for_a_dml_role_say_to_run_them_as_owner(
    owner_app: Chancy, dsn: str, dml_role: str
) -> None:
    await owner_app.migrate(to_version=1)
    grant_dml(dsn, dml_role)
    async with Chancy(as_role(dsn, dml_role)) as app:
        assert not await app.is_up_to_date()
        with pytest.raises(MigrationPermissionError) as caught:
            await app.migrate()
        assert "owner" in str(caught.value)
        assert isinstance(caught.value.__cause__, psycopg.errors.InsufficientPrivilege)
    await owner_app.migrate()
    assert await owner_app.is_up_to_date()
