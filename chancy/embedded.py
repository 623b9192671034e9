"""A real PostgreSQL with zero set-up, for the demo and for tests (``chancy[embedded]``).

Uses the ``pgserver`` package, which ships PostgreSQL binaries in its wheel: nothing has
to be installed on the machine. The server listens on a Unix socket inside the data
directory (no TCP port) and keeps its data between runs.

When run as root, pgserver runs PostgreSQL as a ``pgserver`` OS user and makes every
parent of the data directory traversable by others (``g+rx,o+rx``); that is why the
default directory for root is under ``/var/lib`` rather than in ``/root``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

#: Where ``chancy demo`` keeps its embedded database, below the user data directory.
DEMO_DIRECTORY = "demo-pg"


class EmbeddedServer(Protocol):
    """The parts of a ``pgserver.PostgresServer`` that Chancy uses."""

    def get_uri(self, database: str | None = None) -> str:
        """A libpq URI connecting to the server over its Unix socket."""

    def cleanup(self) -> None:
        """Stop the server (once no other process holds a handle on it)."""


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset; harmless.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            import pgserver
    except ImportError as exc:
        raise ImportError(
            "the embedded PostgreSQL needs pgserver: pip install 'chancy[embedded]' "
            "(wheels exist for CPython 3.11 and 3.12)"
        ) from exc
    return pgserver


def default_data_dir() -> Path:
    """The data directory used when none is given: the user data directory
    (``~/.local/share/chancy/demo-pg`` on Linux), or ``/var/lib/chancy/demo-pg`` for root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/chancy") / DEMO_DIRECTORY
    import platformdirs  # a dependency of pgserver

    return Path(platformdirs.user_data_dir("chancy", appauthor=False)) / DEMO_DIRECTORY


def start_embedded_postgres(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, EmbeddedServer]:
    """Start (or attach to) the embedded server keeping its data in ``data_dir``.

    Returns ``(dsn, server)``; call ``server.cleanup()`` to stop it. The first start runs
    ``initdb`` (about a second); later starts reuse the data.
    """
    pgserver = _import_pgserver()
    path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = getattr(pgserver.PostgresServer, "_lock", None) or contextlib.nullcontext()
    with lock:
        _forget_dead_handles(path.resolve())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        server: EmbeddedServer = pgserver.get_server(str(path.resolve()), cleanup_mode="stop")
    return server.get_uri(), server


def _forget_dead_handles(path: Path) -> None:
    """Drop processes that died without letting go of the server (kill -9, SIGTERM).

    pgserver stops the server when the last process holding a handle lets go; it keeps
    their pids in ``.handle_pids.json``. A dead pid left there would keep the server
    running after every later demo.
    """
    handles = path / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _is_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def embedded_postgres(data_dir: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Run the embedded server for the body of a ``with`` block; yields its DSN."""
    dsn, server = start_embedded_postgres(data_dir)
    try:
        yield dsn
    finally:
        server.cleanup()
