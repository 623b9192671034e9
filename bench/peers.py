"""Peer queues (pgqueuer, procrastinate), each installed from PyPI into its own virtualenv
under bench/.venvs/ and measured by a small script of ours run with that venv's Python.
Nothing here is fatal: an install or run failure becomes an error entry in the results."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from bench.db import ScratchDatabase

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]
    script: str


PEERS = (
    Peer("pgqueuer", ("pgqueuer", "asyncpg"), "pgqueuer_run.py"),
    Peer("procrastinate", ("procrastinate", "psycopg[binary]"), "procrastinate_run.py"),
)


@dataclasses.dataclass
class Installed:
    peer: Peer
    python: Path | None
    version: str | None = None
    error: str | None = None
    seconds: float = 0.0


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def install(peer: Peer, *, timeout: float = 900) -> Installed:
    """Create bench/.venvs/NAME and pip-install the peer unless already done."""
    venv = VENVS / peer.name
    python = venv / "bin" / "python"
    marker = venv / ".bench-requirements"
    wanted = "\n".join(peer.requirements)
    started = time.monotonic()
    try:
        if not (python.exists() and marker.exists() and marker.read_text() == wanted):
            VENVS.mkdir(exist_ok=True)
            steps = [
                [sys.executable, "-m", "venv", "--clear", str(venv)],
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 *peer.requirements],
            ]  # fmt: skip
            for argv in steps:
                done = _run(argv, timeout)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                    raise RuntimeError(f"{' '.join(argv[:4])} failed: {' | '.join(tail)}")
            marker.write_text(wanted)
        probe = _run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({peer.name!r}))"],
            60,
        )
        if probe.returncode != 0:
            raise RuntimeError(f"{peer.name} does not import: {probe.stderr.strip()[-300:]}")
        version = probe.stdout.strip()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return Installed(peer, None, error=str(exc), seconds=time.monotonic() - started)
    return Installed(peer, python, version=version, seconds=time.monotonic() - started)


def _asyncpg_kwargs(dsn: str) -> dict[str, Any]:
    params = conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password"}
    kwargs: dict[str, Any] = {new: params[old] for old, new in names.items() if params.get(old)}
    kwargs["database"] = params.get("dbname")
    if "port" in kwargs:
        kwargs["port"] = int(kwargs["port"])
    return kwargs


async def measure(
    installed: Installed,
    server_dsn: str,
    database: str,
    op: str,
    n: int,
    batch: int,
    log_dir: Path,
    *,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run one peer operation in a fresh database; returns its metrics (or raises)."""
    if installed.python is None:
        raise RuntimeError(f"not installed: {installed.error}")
    scratch = ScratchDatabase(server_dsn, database)
    scratch.create()
    try:
        argv = [
            str(installed.python),
            str(HERE / "peer_scripts" / installed.peer.script),
            "--dsn",
            scratch.dsn,
            "--conn-json",
            json.dumps(_asyncpg_kwargs(scratch.dsn)),
            "--op",
            op,
            "--n",
            str(n),
            "--batch",
            str(batch),
        ]
        log_path = log_dir / f"{installed.peer.name}-{op}.log"
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
        log_path.write_bytes(err)
        lines = out.decode(errors="replace").strip().splitlines()
        if process.returncode != 0 or not lines:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exit {process.returncode}: {' | '.join(tail)}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    finally:
        scratch.drop()
