"""Helpers for the acceptance tests: real worker processes and waiting with a deadline.

Each worker runs ``python -m tests.worker_main`` in a session of its own, so that its
forkserver and executor children (which outlive a ``kill -9`` of the worker) are killed
with it when the test ends. Tests synchronise on the worker's output lines or on database
state, polled until a deadline, never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from psycopg import sql
from psycopg.rows import dict_row

from chancy import Chancy

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
#: The short settings every acceptance worker runs with (see tests/worker_main.py).
HEARTBEAT_TIMEOUT = 2.0
LEASE_TIMEOUT = 2.0
POLL_INTERVAL = 0.5


class WorkerProcess:
    """One running ``tests.worker_main``; its output is collected line by line."""

    def __init__(self, worker_id: str, popen: subprocess.Popen[str]) -> None:
        self.worker_id = worker_id
        self.popen = popen
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{worker_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def mark(self) -> int:
        """The number of lines seen so far (to wait only for later lines)."""
        with self._changed:
            return len(self.lines)

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def find(self, pattern: str, since: int = 0) -> list[re.Match[str]]:
        """Every line (from index ``since``) matching ``pattern``."""
        regex = re.compile(pattern)
        with self._changed:
            found = (regex.search(line) for line in self.lines[since:])
            return [m for m in found if m is not None]

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        """Block until a line (from index ``since``) matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        with self._changed:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match is not None:
                        return match
                remaining = deadline - time.monotonic()
                if self.popen.poll() is not None and not self._reader.is_alive():
                    remaining = min(remaining, 0)
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.worker_id}: no line matching {pattern!r} within {timeout} s "
                        f"(exit code {self.popen.poll()}); output:\n{self.output_unlocked()}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def output_unlocked(self) -> str:
        return "\n".join(self.lines)

    async def line(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        """:meth:`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, timeout, since)

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The worker's exit code; fails the test if it is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.worker_id} still running {timeout} s later; output:\n{self.output()}"
            ) from None

    async def exit_code(self, timeout: float) -> int:
        """:meth:`wait_exit` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_exit, timeout)

    def kill_tree(self) -> None:
        """SIGKILL the worker's session (the worker, its forkserver and job processes)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._reader.join(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class Workers:
    """Starts acceptance workers and kills every one of them (and their children) on exit."""

    #: The worker program each process runs (``python -m <module>``).
    module = "tests.worker_main"

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python = python
        self.env = env
        self.started: list[WorkerProcess] = []

    def spawn(self, worker_id: str | None = None, *flags: str, **settings: Any) -> WorkerProcess:
        """Start a worker without waiting for it; ``settings`` become ``--option value``."""
        worker_id = worker_id or f"w-{uuid.uuid4().hex[:10]}"
        args = [self.python, "-m", self.module, "--worker-id", worker_id]
        for key, value in settings.items():
            values = value if isinstance(value, list | tuple) else [value]
            for item in values:
                args += [f"--{key.replace('_', '-')}", str(item)]
        args += flags
        popen = subprocess.Popen(
            args,
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        process = WorkerProcess(worker_id, popen)
        self.started.append(process)
        return process

    async def start(
        self, worker_id: str | None = None, *flags: str, timeout: float = 20, **settings: Any
    ) -> WorkerProcess:
        """Start a worker and wait until it prints READY."""
        process = self.spawn(worker_id, *flags, **settings)
        await process.line(r"^READY ", timeout)
        return process

    def close(self) -> None:
        for process in self.started:
            process.kill_tree()


@contextlib.contextmanager
def worker_processes(python: str, env: dict[str, str]) -> Iterator[Workers]:
    workers = Workers(python, env)
    try:
        yield workers
    finally:
        workers.close()


# -- waiting and observing ---------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last: {value!r})"
            )
        await asyncio.sleep(interval)


async def query(chancy: Chancy, text: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Rows (as dicts) of ``text``, where ``{jobs}``, ``{workers}``, ``{leader}`` name the
    Chancy tables."""
    statement = sql.SQL(text).format(
        **{name: sql.Identifier(chancy.prefix + name) for name in ("jobs", "workers", "leader")}
    )
    async with chancy.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(statement, params)
        return await cur.fetchall() if cur.description is not None else []


async def job_rows(chancy: Chancy, refs: list[Any]) -> list[dict[str, Any]]:
    """The raw job rows of ``refs`` in push order."""
    rows = await query(
        chancy,
        "SELECT * FROM {jobs} WHERE id = ANY(%(ids)s::uuid[])",
        {"ids": [str(r) for r in refs]},
    )
    by_id = {str(row["id"]): row for row in rows}
    return [by_id[str(r)] for r in refs if str(r) in by_id]


async def worker_row(chancy: Chancy, worker_id: str) -> dict[str, Any] | None:
    rows = await query(
        chancy,
        "SELECT *, expires_at > now() AS alive FROM {workers} WHERE worker_id = %(w)s",
        {"w": worker_id},
    )
    return rows[0] if rows else None


async def lease(chancy: Chancy) -> dict[str, Any] | None:
    """The leadership lease row with a ``valid`` flag (database time), or None."""
    rows = await query(chancy, "SELECT *, expires_at > now() AS valid FROM {leader}")
    return rows[0] if rows else None


async def backends(chancy: Chancy, worker_id: str) -> list[dict[str, Any]]:
    """The server backends of worker ``worker_id`` (found by its application_name).

    ``state_age`` is how many seconds the backend has been in its current state.
    """
    from tests.worker_main import application_name

    return await query(
        chancy,
        "SELECT pid, state, query, backend_start, "
        "extract(epoch FROM now() - state_change)::float AS state_age FROM pg_stat_activity "
        "WHERE application_name = %(app)s",
        {"app": application_name(worker_id)},
    )


def journal(path: Path) -> list[str]:
    """The lines a journaling job (tests.acceptance_jobs) wrote so far."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


async def journal_lines(path: Path, count: int, prefix: str, *, timeout: float) -> list[str]:
    """Wait until at least ``count`` journal lines start with ``prefix``."""

    async def probe() -> list[str]:
        lines = [line for line in journal(path) if line.startswith(prefix)]
        return lines if len(lines) >= count else []

    return await eventually(probe, timeout=timeout, what=f"{count} journal lines {prefix!r}")
