"""Job functions for tests/test_perf_paths.py (run by the Threaded executor, in-process)."""

from __future__ import annotations

import threading

#: Jobs of ``wait_gate`` block until the test opens this gate.
GATE = threading.Event()
#: Arguments of every ``record`` call, in order.
RAN: list[int] = []


def wait_gate() -> str:
    GATE.wait(timeout=30)
    return "through"


def record(n: int) -> int:
    RAN.append(n)
    return n
