"""Job functions the benchmarked workers run: no-ops, and a stamp for pickup latency."""

from __future__ import annotations

import os
import time
from typing import Any

#: The file that :func:`stamp` appends to (set by the harness in the worker's env).
STAMP_FILE_ENV = "BENCH_STAMP_FILE"


async def anoop(**kwargs: Any) -> None:
    """A coroutine that does nothing (AsyncExecutor)."""


def noop(**kwargs: Any) -> None:
    """A function that does nothing (threads, processes)."""


def record_pickup(sent: float) -> None:
    """Append the seconds from ``sent`` (wall clock before the push) to now to the stamp
    file. The clock is read first, so the file write is not part of the figure."""
    elapsed = time.time() - sent
    with open(os.environ[STAMP_FILE_ENV], "a") as handle:
        handle.write(f"{elapsed!r}\n")


async def astamp(sent: float, **kwargs: Any) -> None:
    """Pickup-latency probe for the AsyncExecutor."""
    record_pickup(sent)
