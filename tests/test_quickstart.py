"""The seed quick start, run as written: `python worker.py`, then `python job.py`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, _reachable, schema_dsn

SEED = ROOT.parent / "shared" / "SEED_README.rst"
QUICKSTART_DSN = "postgresql://localhost/postgres"


def readme_blocks() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    worker = next(b for b in blocks if "Worker(chancy).start()" in b)
    job = next(b for b in blocks if "job.my_dummy_task" in b)
    return worker, job


def seed_blocks() -> tuple[str, str]:
    text = SEED.read_text()
    blocks = re.findall(
        r"\.\. code-block:: python\n(?:\s+:caption:.*\n)?\n((?:(?: {3,}.*)?\n)+)", text
    )
    worker, job = (textwrap.dedent(b) for b in blocks[:2])
    # The seed's one typo: a missing closing parenthesis.
    job = job.replace('kwargs={"name": "world"}\n', 'kwargs={"name": "world"})\n')
    return worker, job


def _normalise(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


def test_readme_quick_start_is_the_seed_quick_start() -> None:
    if not SEED.exists():
        pytest.fail(f"{SEED} is missing: the brief's shared/ folder sits beside the repository")
    readme = readme_blocks()
    seed = seed_blocks()
    assert [_normalise(b) for b in readme] == [_normalise(b) for b in seed]


@pytest.fixture
def quickstart_schema(base_dsn: str) -> Iterator[tuple[str, str]]:
    """A fresh schema on the quick start's own DSN (or the test server if unreachable);
    PGOPTIONS points the unmodified code at it."""
    target = QUICKSTART_DSN if _reachable(QUICKSTART_DSN) else base_dsn
    schema = f"qs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield target, schema
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_quick_start_runs_as_written(tmp_path: Path, quickstart_schema: tuple[str, str]) -> None:
    target, schema = quickstart_schema
    worker_code, job_code = readme_blocks()
    if target != QUICKSTART_DSN:
        worker_code = worker_code.replace(QUICKSTART_DSN, target)
    (tmp_path / "worker.py").write_text(worker_code)
    (tmp_path / "job.py").write_text(job_code)
    env = dict(os.environ)
    env["PGOPTIONS"] = f"-c search_path={schema}"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    worker = subprocess.Popen(
        [sys.executable, "worker.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(worker.stdout or ()), daemon=True)
    reader.start()
    try:
        check = schema_dsn(target, schema)
        deadline = time.monotonic() + 30
        while not _worker_registered(check):
            assert worker.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.05)
        pushed = subprocess.run(
            [sys.executable, "job.py"], cwd=tmp_path, env=env, timeout=60, capture_output=True
        )
        assert pushed.returncode == 0, pushed.stderr
        deadline = time.monotonic() + 30
        while "Hello, world!\n" not in lines:
            assert worker.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        reader.join(timeout=5)
        assert not _worker_registered(check)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        reader.join(timeout=5)
        if worker.stdout is not None:
            worker.stdout.close()


def _worker_registered(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM chancy_workers").fetchone()
    except psycopg.errors.UndefinedTable:
        return False
    return bool(row and row[0])
