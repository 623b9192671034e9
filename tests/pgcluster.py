"""A throwaway PostgreSQL cluster that tests may stop, restart and kill.

The machine's shared server must never be restarted by a test, so the restart tests run
on a cluster of their own: ``initdb`` into a fresh temporary directory, trust auth,
``fsync=off``, listening on 127.0.0.1 on a free port and on a socket inside that
directory. As root, every server command runs as the ``postgres`` OS user (PostgreSQL
refuses to run as root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

SERVER_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, else the
    directory of an ``initdb`` on PATH, else None."""
    versions = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for entry in root.iterdir():
            if re.fullmatch(r"\d+(\.\d+)?", entry.name) and (entry / "bin" / "initdb").exists():
                versions.append((tuple(int(p) for p in entry.name.split(".")), entry / "bin"))
    if versions:
        return max(versions)[1]
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One private cluster; ``start``/``stop``/``restart`` block until done."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.logfile = root / "server.log"
        self.port = port
        self._as_root = os.geteuid() == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo("", host="127.0.0.1", port=self.port, user=SERVER_USER, dbname=dbname)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self.server_log()}"
            )
        return result

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SERVER_USER, "-E", "UTF8")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# chancy test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.logfile)
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))

    def restart(self, mode: str = "fast") -> None:
        self._run(
            "pg_ctl", "restart", "-w", "-t", "60", "-m", mode, "-D", str(self.data),
            "-l", str(self.logfile),
        )  # fmt: skip

    def is_running(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        return pid_file.exists()

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until a connection succeeds (``pg_ctl -w`` may return a bit early)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """Start a throwaway cluster; stop it (immediate) and delete its files afterwards."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(
            "no initdb found (looked in /usr/lib/postgresql/*/bin and on PATH): "
            "install the PostgreSQL server package to run the restart tests"
        )
    root = Path(tempfile.mkdtemp(prefix="chancy-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SERVER_USER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    root.chmod(0o700)
    (root / "sock").mkdir()
    if os.geteuid() == 0:
        os.chown(root / "sock", owner.pw_uid, owner.pw_gid)
    cluster = PgCluster(bindir, root, free_port())
    try:
        cluster.init()
        cluster.start()
        cluster.wait_ready()
        yield cluster
    finally:
        if cluster.is_running():
            with contextlib.suppress(Exception):
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
