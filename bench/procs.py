"""Worker processes started and measured from outside: readiness, memory, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from bench import stats

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A ``python -m bench.worker_main`` child; its stderr goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _open_log(self) -> BinaryIO:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.log_path, "ab")

    async def start(self, timeout: float = 30) -> None:
        with self._open_log() as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.worker_main",
                *self.args,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                cwd=ROOT,
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError(f"worker did not start; see {self.log_path}: {self.tail()}")

    def memory(self) -> dict[str, float]:
        """The worker's own RSS and peak RSS, and the RSS of it plus its children."""
        figures = stats.proc_memory_mb(self.pid)
        figures["tree_rss_mb"] = stats.tree_rss_mb(self.pid)
        return figures

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, wait for a graceful exit, SIGKILL the whole group if it lingers."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                for pid in [*stats.descendants(self.pid), self.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await self.process.wait()
        return self.process.returncode


@contextlib.asynccontextmanager
async def running_worker(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[WorkerProcess]:
    worker = WorkerProcess(args, log_path, env)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
