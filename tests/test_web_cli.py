"""``chancy worker web``: the dashboard served by the real command in a child process."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest

from chancy import Chancy

APP_SOURCE = """
import os

from chancy import Chancy

chancy = Chancy(os.environ["CHANCY_TEST_DSN_SCHEMA"])
"""


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for(lines: queue.Queue[str], pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            pytest.fail("no match for " + pattern + " in:\n" + "".join(seen))
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@pytest.mark.parametrize("password", [None, "from-the-env"])
def test_worker_web_serves_the_dashboard_until_sigterm(
    tmp_path: Path, dsn: str, subprocess_env: dict[str, str], password: str | None
) -> None:
    with Chancy(dsn) as chancy:
        chancy.sync_migrate()
    (tmp_path / "web_cli_app.py").write_text(APP_SOURCE)
    env = dict(subprocess_env)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    env.pop("CHANCY_WEB_PASSWORD", None)
    env["CHANCY_WEB_USERNAME"] = "ops"
    if password:
        env["CHANCY_WEB_PASSWORD"] = password
    command = [sys.executable, "-m", "chancy.cli", "--app", "web_cli_app:chancy"]
    command += ["worker", "web", "--port", "0"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        if password is None:
            match = _wait_for(lines, r"user 'ops', generated password (\S+)", seen)
            password = match.group(1)
        url = _wait_for(lines, r"dashboard on (http://127\.0\.0\.1:\d+/)", seen).group(1)
        with httpx2.Client(base_url=url) as http:
            assert http.get("/api/v1/queues").status_code == 401
            wrong = http.post("/api/v1/login", json={"username": "ops", "password": "x"})
            assert wrong.status_code == 401
            ok = http.post("/api/v1/login", json={"username": "ops", "password": password})
            assert ok.status_code == 200
            assert http.get("/api/v1/queues").json()["queues"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
