"""A throwaway PgBouncer in transaction pooling mode, for tests that run Chancy behind it.

Debian's ``pgbouncer`` package provides the binary (``apt-get install -y pgbouncer``); the
process started here has its own port, configuration and logs in a temporary directory
and is stopped afterwards. As root it runs as the ``postgres`` OS user (PgBouncer refuses
to run as root). The server connections of the ``chancy`` database alias set the test's
``search_path`` once, with ``connect_query``: PgBouncer does not forward the ``options``
startup parameter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

RUN_AS = "postgres"
#: The PgBouncer settings Chancy needs; docs/reliability.md explains each.
SETTINGS = {
    "pool_mode": "transaction",
    "auth_type": "trust",
    "max_client_conn": "200",
    "default_pool_size": "20",
    "server_reset_query": "",
    "ignore_startup_parameters": "extra_float_digits",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def pgbouncer(server_dsn: str, search_path: str) -> Iterator[str]:
    """Run PgBouncer in front of ``server_dsn``; yields the DSN clients connect to."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is not installed: apt-get install -y pgbouncer")
    server = conninfo_to_dict(server_dsn)
    host = server.get("host") or "127.0.0.1"
    if str(host).startswith("/"):
        host = "127.0.0.1"  # PgBouncer reaches the server over TCP
    root = Path(tempfile.mkdtemp(prefix="chancy-pgbouncer-"))
    port = free_port()
    user = server.get("user") or "postgres"
    target = (
        f"host={host} port={server.get('port') or 5432} dbname={server.get('dbname') or 'test'} "
        f"user={user} connect_query='SET search_path = {search_path}'"
    )
    lines = [
        "[databases]",
        f"chancy = {target}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        f"auth_file = {root / 'users.txt'}",
        f"logfile = {root / 'pgbouncer.log'}",
        f"pidfile = {root / 'pgbouncer.pid'}",
        *(f"{key} = {value}" for key, value in SETTINGS.items()),
    ]
    (root / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
    (root / "users.txt").write_text(f'"{user}" ""\n')
    command = [binary, str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:
        owner = pwd.getpwnam(RUN_AS)
        for path in (root, *root.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        command = ["runuser", "-u", RUN_AS, "--", *command]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    dsn = make_conninfo("", host="127.0.0.1", port=port, dbname="chancy", user=user)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(dsn, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (
                        (root / "pgbouncer.log").read_text()
                        if (root / "pgbouncer.log").exists()
                        else ""
                    )
                    raise RuntimeError(f"pgbouncer did not start:\n{log}") from None
                time.sleep(0.05)
        yield dsn
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(root, ignore_errors=True)
