"""``chancy demo``: on the test database, and on an embedded PostgreSQL (pgserver)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from chancy import Chancy, Queue
from chancy.cli import main
from chancy.embedded import default_data_dir

SUMMARY = re.compile(
    r"Ran (?P<jobs>\d+) jobs on queue '(?P<queue>[^']+)'.*\n"
    r"\s+succeeded\s+(?P<succeeded>\d+)\n"
    r"\s+failed\s+(?P<failed>\d+)\n"
    r"\s+elapsed\s+(?P<elapsed>[\d.]+) s.*\n"
    r"\s+throughput\s+(?P<rate>[\d.]+) jobs/s"
)


def summary(output: str) -> dict[str, str]:
    match = SUMMARY.search(output)
    assert match, output
    return match.groupdict()


@pytest.mark.parametrize("executor", ["async", "threaded"])
def test_demo_on_a_given_dsn(dsn: str, executor: str) -> None:
    result = CliRunner().invoke(
        main, ["demo", "--dsn", dsn, "--jobs", "20", "--executor", executor]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    numbers = summary(result.stdout)
    assert (numbers["jobs"], numbers["succeeded"], numbers["failed"]) == ("20", "20", "0")
    assert float(numbers["rate"]) > 0
    assert "Pushing" in result.stderr and "Running" in result.stderr


def test_demo_options_come_from_the_environment(dsn: str) -> None:
    env = {"CHANCY_DEMO_DSN": dsn, "CHANCY_DEMO_JOBS": "7", "CHANCY_DEMO_QUEUE": "from-env"}
    result = CliRunner().invoke(main, ["demo"], env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    numbers = summary(result.stdout)
    assert (numbers["jobs"], numbers["queue"], numbers["succeeded"]) == ("7", "from-env", "7")


def test_demo_reports_failures_and_leaves_its_queue(dsn: str) -> None:
    args = ["demo", "--dsn", dsn, "--jobs", "20", "--fail-every", "5", "--queue", "show"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    numbers = summary(result.stdout)
    assert (numbers["succeeded"], numbers["failed"], numbers["queue"]) == ("16", "4", "show")

    async def stored_queue() -> Queue | None:
        async with Chancy(dsn) as chancy:
            return await chancy.get_queue("show")

    queue = asyncio.run(stored_queue())
    assert queue is not None
    assert queue.executor == Chancy.Executor.Async.value


def test_demo_rejects_bad_input(dsn: str) -> None:
    runner = CliRunner()
    bad_queue = runner.invoke(main, ["demo", "--dsn", dsn, "--queue", "no spaces"])
    assert bad_queue.exit_code == 1
    assert bad_queue.stderr.startswith("Error: invalid queue name")
    mixed = runner.invoke(main, ["demo", "--dsn", dsn, "--data-dir", "/tmp/unused"])
    assert mixed.exit_code == 2
    assert "--data-dir is only for the embedded PostgreSQL" in mixed.stderr
    down = runner.invoke(main, ["demo", "--dsn", "host=127.0.0.1 port=1 dbname=none"])
    assert down.exit_code == 1
    assert down.stderr.startswith("Error: database unavailable")


def test_default_data_dir_is_outside_root_home() -> None:
    path = default_data_dir()
    assert path.name == "demo-pg"
    if os.geteuid() == 0:
        assert path == Path("/var/lib/chancy/demo-pg")
    else:
        assert "chancy" in path.parts


@pytest.fixture
def fresh_data_dir() -> Iterator[Path]:
    """A new directory under /tmp (pgserver opens up every parent of the data directory,
    so it must not live in pytest's private temporary tree); removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="chancy-demo-test-", dir="/tmp"))
    data_dir = parent / "pg"
    yield data_dir
    pid_file = data_dir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        # Only if the demo failed to stop the server it started.
        os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGTERM)
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(
    importlib.util.find_spec("pgserver") is None, reason="needs pip install 'chancy[embedded]'"
)
def test_demo_on_embedded_postgres(fresh_data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHANCY_", "PG"))}
    command = [sys.executable, "-m", "chancy.cli", "demo", "--data-dir", str(fresh_data_dir)]
    for attempt in ("first", "second"):  # the second run reuses the initialised data
        result = subprocess.run(
            [*command, "--jobs", "20"],
            env=env,
            cwd=fresh_data_dir.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (attempt, result.stdout, result.stderr)
        numbers = summary(result.stdout)
        assert (numbers["succeeded"], numbers["failed"]) == ("20", "0"), attempt
        assert f"embedded PostgreSQL in {fresh_data_dir}" in result.stderr
        assert (fresh_data_dir / "PG_VERSION").exists()
        # The demo stops the server it started.
        assert not (fresh_data_dir / "postmaster.pid").exists()
