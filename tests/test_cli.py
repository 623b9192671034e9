"""The ``chancy`` command line, against a real PostgreSQL (one schema per test)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chancy import Chancy, QueuedJob
from chancy.cli import main

APP_MODULE = "chancy_cli_test_app"
APP = f"{APP_MODULE}:chancy"
APP_SOURCE = """
import os

from chancy import Chancy

chancy = Chancy(os.environ["CHANCY_TEST_DSN_SCHEMA"])


def make_chancy():
    return Chancy(os.environ["CHANCY_TEST_DSN_SCHEMA"])


not_chancy = 42
"""

Invoke = Callable[..., Result]


@pytest.fixture
def app_dir(tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory holding the app module, importable in this process and its children."""
    (tmp_path / f"{APP_MODULE}.py").write_text(APP_SOURCE)
    monkeypatch.setenv("CHANCY_TEST_DSN_SCHEMA", dsn)
    monkeypatch.delenv("CHANCY_APP", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, APP_MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(APP_MODULE, None)


@pytest.fixture
def cli(app_dir: Path) -> Invoke:
    """Run ``chancy --app <test app> ARGS...`` in-process; asserts the exit code."""
    runner = CliRunner()

    def invoke(
        *args: str, code: int = 0, app: str | None = APP, stdin: str | None = None
    ) -> Result:
        prefix = ["--app", app] if app else []
        result = runner.invoke(main, [*prefix, *args], input=stdin)
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


@pytest.fixture
def migrated(cli: Invoke) -> Invoke:
    cli("misc", "migrate")
    return cli


def test_check_migrations_before_and_after_migrate(cli: Invoke) -> None:
    pending = cli("misc", "check-migrations", code=1)
    assert "migrations are pending" in pending.stderr
    assert "Migrated" in cli("misc", "migrate").stdout
    assert "up to date" in cli("misc", "check-migrations").stdout
    cli("misc", "migrate", "--to-version", "0")
    cli("misc", "check-migrations", code=1)
    cli("misc", "migrate")
    cli("misc", "check-migrations")


def test_worker_refuses_to_start_before_migrations(cli: Invoke) -> None:
    result = cli("worker", "start", code=1)
    assert "migrat" in result.stderr
    assert "Traceback" not in result.output


def test_queue_declare_list_pause_resume_delete(migrated: Invoke) -> None:
    cli = migrated
    declared = cli("queue", "declare", "emails", "--executor", "threaded", "--concurrency", "3")
    assert "threaded executor, concurrency 3" in declared.stdout
    cli("queue", "declare", "reports", "-e", "async", "-t", "gpu", "-t", "big.*")

    # Re-declaring with other settings keeps the stored queue unless --upsert is given.
    kept = cli("queue", "declare", "emails", "--concurrency", "9")
    assert "--upsert" in kept.stderr
    assert "concurrency 3" in kept.stdout
    cli("queue", "declare", "emails", "--concurrency", "9", "--polling-interval", "0.5", "--upsert")

    table = cli("queue", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "EXECUTOR", "CONCURRENCY", "POLLING", "TAGS"]
    assert table[1].split() == ["emails", "active", "process", "9", "0.5s", ".*"]
    assert table[2].split() == ["reports", "active", "async", "default", "5s", "big.*,gpu"]

    cli("queue", "pause", "emails", "--resume-at", "2999-01-01T00:00:00+00:00")
    cli("queue", "pause", "reports")
    queues = {q["name"]: q for q in json.loads(cli("queue", "list", "--json").stdout)}
    assert queues["emails"]["state"] == "paused"
    assert queues["emails"]["resume_at"].startswith("2999-01-01T00:00:00")
    assert queues["reports"]["state"] == "paused"
    assert queues["reports"]["tags"] == ["big.*", "gpu"]
    assert queues["reports"]["executor"] == Chancy.Executor.Async.value

    cli("queue", "resume", "reports")
    queues = {q["name"]: q for q in json.loads(cli("queue", "list", "--json").stdout)}
    assert queues["reports"]["state"] == "active"

    cli("queue", "delete", "emails")
    assert "jobs kept" in cli("queue", "delete", "reports", "--keep-jobs").stdout
    assert json.loads(cli("queue", "list", "--json").stdout) == []
    assert "No queues" in cli("queue", "list").stdout
    assert "no queue named 'emails'" in cli("queue", "delete", "emails", code=1).stderr


def test_push_get_cancel_retry(migrated: Invoke) -> None:
    cli = migrated
    cli("queue", "declare", "q")
    pushed = cli(
        "queue", "push", "q", "tests.jobs.add",
        "--kwargs", '{"a": 1, "b": 2}',
        "--priority", "7",
        "--max-attempts", "3",
        "--unique-key", "only-one",
    )  # fmt: skip
    job_id = pushed.stdout.strip()
    uuid.UUID(job_id)

    again = cli("queue", "push", "q", "tests.jobs.add", "--unique-key", "only-one")
    assert again.stdout.strip() == job_id
    assert "already exists" in again.stderr

    job = json.loads(cli("job", "get", job_id).stdout)
    assert job["id"] == job_id
    assert job["func"] == "tests.jobs.add"
    assert job["kwargs"] == {"a": 1, "b": 2}
    assert (job["priority"], job["max_attempts"], job["attempts"]) == (7, 3, 0)
    assert job["state"] == "pending"
    assert job["unique_key"] == "only-one"
    assert job["created_at"] is not None

    assert "has not finished" in cli("job", "retry", job_id, code=1).stderr  # still pending
    cli("job", "cancel", job_id)
    assert json.loads(cli("job", "get", job_id).stdout)["state"] == "cancelled"
    assert "already finished" in cli("job", "cancel", job_id, code=1).stderr

    cli("job", "retry", job_id)
    assert json.loads(cli("job", "get", job_id).stdout)["state"] == "pending"

    missing = str(uuid.uuid4())
    assert f"no job {missing}" in cli("job", "get", missing, code=1).stderr

    scheduled = cli(
        "queue", "push", "q", "tests.jobs.noop", "--scheduled-at", "2999-01-01T12:00:00"
    ).stdout.strip()  # fmt: skip
    assert json.loads(cli("job", "get", scheduled).stdout)["scheduled_at"].startswith("2999-01-01")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["queue", "declare", "bad name!"], "invalid queue name 'bad name!'"),
        (["queue", "push", "bad name!", "tests.jobs.noop"], "invalid queue name"),
        (["queue", "push", "nowhere", "tests.jobs.noop"], "unknown queue 'nowhere'"),
        (["queue", "push", "q", "not a function"], "invalid job function"),
        (["queue", "push", "q", "tests.jobs.noop", "--priority", "99999"], "out of range"),
        (["queue", "pause", "nowhere"], "unknown queue 'nowhere'"),
        (["job", "get", "not-a-uuid"], "not a job id"),
        (["job", "cancel", "not-a-uuid"], "not a job id"),
    ],
)
def test_chancy_errors_are_one_clean_line(migrated: Invoke, args: list[str], message: str) -> None:
    migrated("queue", "declare", "q")
    result = migrated(*args, code=1)
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["queue", "push", "q", "tests.jobs.noop", "--kwargs", "{nope"], "invalid JSON"),
        (["queue", "push", "q", "tests.jobs.noop", "--kwargs", "[1]"], "JSON object"),
        (["queue", "declare", "q", "--executor", "fast"], "use one of process"),
        (["queue", "pause", "q", "--resume-at", "tomorrow"], "ISO 8601"),
        (["queue", "declare", "q", "--concurrency", "0"], "0"),
    ],
)
def test_bad_options_are_usage_errors(migrated: Invoke, args: list[str], message: str) -> None:
    result = migrated(*args, code=2)
    assert message in result.stderr


def test_app_loading(cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--app" in cli("queue", "list", app=None, code=2).stderr
    assert (
        "cannot import module 'no_such_mod'"
        in cli("queue", "list", app="no_such_mod:chancy", code=2).stderr
    )
    assert (
        "has no attribute 'nope'" in cli("queue", "list", app=f"{APP_MODULE}:nope", code=2).stderr
    )
    assert (
        "not a Chancy instance"
        in cli("queue", "list", app=f"{APP_MODULE}:not_chancy", code=2).stderr
    )
    assert "module:attribute" in cli("queue", "list", app=APP_MODULE, code=2).stderr
    # A zero-argument factory works, and so does CHANCY_APP.
    cli("misc", "migrate", app=f"{APP_MODULE}:make_chancy")
    monkeypatch.setenv("CHANCY_APP", APP)
    assert "No queues" in cli("queue", "list", app=None).stdout


def test_unreachable_database_is_a_clean_error(app_dir: Path) -> None:
    (app_dir / "chancy_cli_down_app.py").write_text(
        "from chancy import Chancy\nchancy = Chancy('host=127.0.0.1 port=1 dbname=none')\n"
    )
    started = time.monotonic()
    result = CliRunner().invoke(main, ["--app", "chancy_cli_down_app:chancy", "queue", "list"])
    sys.modules.pop("chancy_cli_down_app", None)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: database unavailable")
    assert time.monotonic() - started < 10


def test_shell_runs_sync_and_async_calls(migrated: Invoke) -> None:
    migrated("queue", "declare", "from-cli")
    script = "print(sorted(q.name for q in run(chancy.get_all_queues())))\nprint(Queue)\n"
    result = migrated("misc", "shell", stdin=script)
    assert "['from-cli']" in result.stdout
    assert "chancy.queue.Queue" in result.stdout


def test_console_script_finds_app_in_current_directory(
    app_dir: Path, subprocess_env: dict[str, str]
) -> None:
    script = Path(sys.executable).with_name("chancy")
    result = subprocess.run(
        [str(script), "--app", APP, "misc", "check-migrations"],
        cwd=app_dir,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "migrations are pending" in result.stderr


def _wait_until(
    predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60
) -> None:
    """Poll ``predicate`` until true; fail early if ``proc`` exits, or at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"worker exited with {proc.returncode}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("executor", ["process", "threaded"])
def test_worker_start_runs_jobs_and_stops_on_sigterm(
    migrated: Invoke,
    app_dir: Path,
    dsn: str,
    python: str,
    subprocess_env: dict[str, str],
    executor: str,
) -> None:
    migrated("queue", "declare", "work", "--executor", executor, "--polling-interval", "0.2")
    migrated("queue", "declare", "other", "--executor", executor, "--polling-interval", "0.2")
    first = migrated("queue", "push", "work", "tests.jobs.add", "--kwargs", '{"a": 2, "b": 3}')
    ignored = migrated("queue", "push", "other", "tests.jobs.noop").stdout.strip()

    command = [python, "-m", "chancy.cli", "--app", APP, "worker", "start"]
    command += ["-q", "work", "--concurrency", "2", "-t", "cli-test", "--worker-id", "cli-w1"]
    proc = subprocess.Popen(
        command, cwd=app_dir, env=subprocess_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with Chancy(dsn) as chancy:

            def finished(job_id: str) -> Callable[[], bool]:
                def check() -> bool:
                    job = chancy.sync_get_job(job_id)
                    return job is not None and job.is_finished

                return check

            _wait_until(finished(first.stdout.strip()), proc)
            # A job pushed while the worker runs is picked up too (by notification or poll).
            second = migrated("queue", "push", "work", "tests.jobs.echo", "--kwargs", '{"x": 1}')
            _wait_until(finished(second.stdout.strip()), proc)

            done = chancy.sync_get_job(first.stdout.strip())
            assert done is not None
            assert done.state == QueuedJob.State.SUCCEEDED, done.errors
            assert done.result == 5
            assert done.taken_by == "cli-w1"
            other = chancy.sync_get_job(ignored)
            assert other is not None and other.state == QueuedJob.State.PENDING  # not served

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "worker cli-w1 serving work" in err
    assert "worker cli-w1 stopped" in err
    assert "Traceback" not in err


def test_demo_uses_the_app(cli: Invoke) -> None:
    result = cli("demo", "--jobs", "5", "--queue", "app-demo")
    assert "Ran 5 jobs on queue 'app-demo'" in result.stdout
    assert "succeeded   5" in result.stdout
    assert "embedded" not in result.stderr
    assert "app-demo" in cli("queue", "list").stdout
