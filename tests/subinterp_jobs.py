"""Jobs for the sub-interpreter tests; they import nothing that needs the main interpreter."""

from __future__ import annotations

import sys
import time


def square(x: int) -> dict[str, object]:
    return {"square": x * x, "interpreter_modules": len(sys.modules)}


def fail() -> None:
    raise KeyError("inside a sub-interpreter")


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"
