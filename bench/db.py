"""Scratch databases and schemas, so that every scenario run starts from empty tables."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_DSN = "host=/var/run/postgresql dbname=test user=postgres"
DSN_ENV = "CHANCY_BENCH_DSN"


def base_dsn(explicit: str | None = None) -> str:
    """The server to benchmark on: ``--dsn``, else ``$CHANCY_BENCH_DSN``, else local."""
    return explicit or os.environ.get(DSN_ENV) or DEFAULT_DSN


def with_params(dsn: str, **params: Any) -> str:
    """``dsn`` with some connection parameters replaced."""
    values = conninfo_to_dict(dsn)
    values.update(params)
    return make_conninfo("", **values)


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` whose connections see ``schema`` first; tagged with an application name
    so that leftover sessions can be found and ended."""
    values = conninfo_to_dict(dsn)
    options = str(values.get("options") or "")
    values["options"] = f"{options} -c search_path={schema}".strip()
    values["application_name"] = f"bench_{schema}"
    return make_conninfo("", **values)


def _terminate(conn: psycopg.Connection[Any], clause: str, value: str) -> None:
    conn.execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE pid <> pg_backend_pid() AND {clause} = %s",
        (value,),
    )


class ScratchDatabase:
    """A database created for one bench invocation and dropped after it."""

    def __init__(self, server_dsn: str, name: str) -> None:
        self.server_dsn = server_dsn
        self.name = name
        self.dsn = with_params(server_dsn, dbname=name)

    def create(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            _terminate(conn, "datname", self.name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            _terminate(conn, "datname", self.name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name)))

    @contextlib.contextmanager
    def schema(self, label: str) -> Iterator[str]:
        """A fresh schema in this database; yields a DSN that uses it; drops it after."""
        schema = f"{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield schema_dsn(self.dsn, schema)
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                _terminate(conn, "application_name", f"bench_{schema}")
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
