"""Django integration (``pip install chancy[django]``; Django 4.2+ with psycopg 3, and
Django 6+ for the ``django.tasks`` backend in :mod:`chancy.contrib.django.tasks`).

- :func:`get_chancy` builds (once) the project's :class:`~chancy.Chancy` from settings: the
  ``TASKS`` backend's if one is Chancy's, else ``settings.CHANCY`` (``DATABASE`` alias,
  ``DSN``, ``PREFIX``, ``OPTIONS`` for the constructor), else ``DATABASES["default"]``.
- :func:`push` / :func:`push_many` enqueue on Django's own connection, so the job commits or
  rolls back with the view's transaction (``ATOMIC_REQUESTS`` or ``transaction.atomic``);
  :func:`push_on_commit` pushes once the current transaction has committed.
- Add ``"chancy.contrib.django"`` to ``INSTALLED_APPS`` for the read-only admin and the
  ``manage.py chancy ...`` command.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from chancy.app import Chancy
from chancy.errors import ConfigurationError
from chancy.job import Job, Reference

__all__ = [
    "apush",
    "database_dsn",
    "get_chancy",
    "opened",
    "push",
    "push_many",
    "push_on_commit",
    "raw_connection",
    "setup_child",
]

#: Keys of ``DATABASES[...]`` that map to libpq connection parameters.
_DATABASE_KEYS = (
    ("NAME", "dbname"),
    ("USER", "user"),
    ("PASSWORD", "password"),
    ("HOST", "host"),
    ("PORT", "port"),
)


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())


def database_dsn(settings_dict: Mapping[str, Any]) -> str:
    """A libpq DSN for a ``DATABASES`` entry. Django-only ``OPTIONS`` (``pool``,
    ``server_side_binding``, ``isolation_level``...) are left out."""
    params: dict[str, Any] = {}
    for key, name in _DATABASE_KEYS:
        if settings_dict.get(key):
            params[name] = settings_dict[key]
    keywords = _libpq_keywords()
    for key, value in (settings_dict.get("OPTIONS") or {}).items():
        if key in keywords and value is not None:
            params[key] = value
    return make_conninfo("", **params)


def _settings() -> Any:
    from django.conf import settings

    return settings


def chancy_from_settings() -> Chancy:
    """A new :class:`Chancy` configured by ``settings.CHANCY`` (or the default database)."""
    from django.db import connections

    config: Mapping[str, Any] = getattr(_settings(), "CHANCY", None) or {}
    dsn = config.get("DSN") or database_dsn(
        connections[config.get("DATABASE", "default")].settings_dict
    )
    options = dict(config.get("OPTIONS") or {})
    if "PREFIX" in config:
        options["prefix"] = config["PREFIX"]
    return Chancy(dsn, **options)


@functools.cache
def get_chancy() -> Chancy:
    """The project's :class:`Chancy`: the ``TASKS`` Chancy backend's (the ``default``
    alias first), else one built by :func:`chancy_from_settings`. Built once per process."""
    backend = _tasks_backend()
    if backend is not None:
        return backend.chancy  # type: ignore[no-any-return]
    return chancy_from_settings()


def _tasks_backend() -> Any:
    """The first ``TASKS`` backend that is a ChancyBackend, or None."""
    tasks = getattr(_settings(), "TASKS", None) or {}
    aliases = sorted(tasks, key=lambda alias: alias != "default")
    for alias in aliases:
        if str(tasks[alias].get("BACKEND", "")).startswith("chancy.contrib.django"):
            from django.tasks import task_backends

            return task_backends[alias]
    return None


def raw_connection(using: str = "default") -> psycopg.Connection[Any]:
    """The psycopg 3 connection under Django's connection ``using`` (opened if needed).

    Statements run on it take part in Django's current transaction."""
    from django.db import connections

    connection = connections[using]
    if connection.vendor != "postgresql":
        raise ConfigurationError(f"database {using!r} is not PostgreSQL")
    connection.ensure_connection()
    raw = connection.connection
    if not isinstance(raw, psycopg.Connection):
        raise ConfigurationError(
            f"database {using!r} does not use psycopg 3 (Django 4.2+ with psycopg installed)"
        )
    return raw


def push(job: Job, *, using: str = "default", chancy: Chancy | None = None) -> Reference:
    """Enqueue ``job`` on Django's connection ``using``: inside ``transaction.atomic`` (or
    ``ATOMIC_REQUESTS``) the job exists if and only if the transaction commits."""
    app = chancy or get_chancy()
    return app.sync_push_ex(raw_connection(using), job)


async def apush(job: Job, *, using: str = "default", chancy: Chancy | None = None) -> Reference:
    """:func:`push` for async views: runs it in Django's sync thread, on the connection
    (and transaction) that sync code there uses."""
    from asgiref.sync import sync_to_async

    ref: Reference = await sync_to_async(push, thread_sensitive=True)(
        job, using=using, chancy=chancy
    )
    return ref


def push_many(
    jobs: Iterable[Job], *, using: str = "default", chancy: Chancy | None = None
) -> list[Reference]:
    """Enqueue many jobs in one statement on Django's connection ``using``."""
    app = chancy or get_chancy()
    return app.sync_push_many_ex(raw_connection(using), jobs)


def push_on_commit(
    job: Job, *, using: str = "default", chancy: Chancy | None = None, robust: bool = False
) -> None:
    """Push ``job`` once the current transaction on ``using`` commits (at once outside a
    transaction) through the Chancy's own pool; nothing is pushed if it rolls back. Prefer
    :func:`push`; this one suits a transaction on a database other than the jobs' one."""
    from django.db import transaction

    app = chancy or get_chancy()
    transaction.on_commit(lambda: opened(app).sync_push(job), using=using, robust=robust)


_open_lock = threading.Lock()


def opened(app: Chancy) -> Chancy:
    """``app`` with its sync pool open (opened on first use, closed at exit)."""
    with _open_lock:
        if app._sync_pool is None:
            app.__enter__()
            atexit.register(app.__exit__, None, None, None)
    return app


def setup_child() -> None:
    """A Process executor ``initializer``: set Django up in each child process (the worker
    passes ``DJANGO_SETTINGS_MODULE`` down through the environment)."""
    import django

    django.setup()
