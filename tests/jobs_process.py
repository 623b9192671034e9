"""Job functions for tests/test_executors_process.py (run in Process executor children)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.jobs_jobs import wait_for_file


def touch(path: str) -> int:
    """Leave a mark that this job ran; returns the pid of the child that ran it."""
    Path(path).touch()
    return os.getpid()


def started_then_wait(started: str, gate: str) -> None:
    """Mark that the job started, then block until the test opens ``gate``."""
    Path(started).touch()
    wait_for_file(gate)


def started_then_sleep(started: str, seconds: float) -> None:
    Path(started).touch()
    time.sleep(seconds)
