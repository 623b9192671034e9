"""pytest fixtures shared by the Django test modules (``pytest_plugins`` there)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from chancy import Chancy
from chancy.contrib.django import database_dsn, opened


def _server_dsn() -> str:
    from django.conf import settings

    entry = dict(settings.DATABASES["default"])
    entry["OPTIONS"] = {}
    return database_dsn(entry)


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker: Any) -> Iterator[None]:
    """Use the run's own schema on the test server instead of a test database."""
    from django.conf import settings
    from django.core.management import call_command
    from django.tasks import task_backends

    schema = settings.SCHEMA
    server = _server_dsn()
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        with django_db_blocker.unblock():
            call_command("migrate", verbosity=0)
            opened(task_backends["default"].chancy).sync_migrate()
        yield
    finally:
        with django_db_blocker.unblock():
            from django.db import connections

            connections.close_all()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{schema}%",),
            )
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def chancy_tables(django_db_setup: None, django_db_blocker: Any) -> Iterator[Chancy]:
    """The default backend's Chancy, with the jobs and queues tables emptied first."""
    from django.tasks import task_backends

    chancy: Chancy = task_backends["default"].chancy
    with psycopg.connect(chancy.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM chancy_jobs")
        conn.execute("DELETE FROM chancy_queues")
    for alias in ("default", "process"):
        task_backends[alias].declare_queues()
    yield chancy
