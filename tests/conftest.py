"""Fixtures: a real PostgreSQL for every test, isolated by a schema of its own.

The server is ``CHANCY_TEST_DSN`` if set, else the local server, else an embedded one
(``pip install chancy[embedded]``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chancy import Chancy

ROOT = Path(__file__).resolve().parent.parent

# Sub-interpreters need CPython 3.13: scripts/test runs this file on that interpreter.
collect_ignore = ["test_subinterpreter.py"] if sys.version_info < (3, 13) else []
# The Django tests need Django 6 (django.tasks, Python 3.12+): scripts/test-django runs them.
if sys.version_info < (3, 12) or importlib.util.find_spec("django") is None:
    collect_ignore += ["test_django.py", "test_django_tasks.py"]
LOCAL_CANDIDATES = (
    "host=/var/run/postgresql dbname=test user=postgres",
    "host=127.0.0.1 port=5432 dbname=test user=postgres",
    "host=127.0.0.1 port=5432 dbname=postgres user=postgres",
)


def _reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def base_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN of a PostgreSQL server the tests may create schemas in."""
    explicit = os.environ.get("CHANCY_TEST_DSN")
    if explicit:
        yield explicit
        return
    for candidate in LOCAL_CANDIDATES:
        if _reachable(candidate):
            yield candidate
            return
    try:
        import pgserver  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pytest.exit("no PostgreSQL: set CHANCY_TEST_DSN or pip install 'chancy[embedded]'", 2)
    server = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    yield server.get_uri()
    with contextlib.suppress(Exception):
        server.cleanup()


def schema_dsn(base: str, schema: str) -> str:
    """``base`` with its search_path set to ``schema``."""
    params = conninfo_to_dict(base)
    options = params.get("options") or ""
    params["options"] = f"{options} -c search_path={schema}".strip()
    return make_conninfo("", **params)


@pytest.fixture
def dsn(base_dsn: str) -> Iterator[str]:
    """A DSN whose connections see only a fresh schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
    yield schema_dsn(base_dsn, schema)
    with psycopg.connect(base_dsn, autocommit=True) as conn:
        # Workers a test left behind must not hold locks on the schema.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{schema}%",),
        )
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(schema))
        )


@pytest.fixture
async def chancy(dsn: str) -> AsyncIterator[Chancy]:
    """A migrated Chancy with its async pool open."""
    app = Chancy(dsn)
    async with app:
        await app.migrate()
        yield app


@pytest.fixture
def subprocess_env(dsn: str) -> dict[str, str]:
    """Environment for child Python processes: the test DSN and importable test helpers."""
    env = dict(os.environ)
    env["CHANCY_TEST_DSN_SCHEMA"] = dsn
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for child processes."""
    return sys.executable
