"""Progress reporting from inside a running job.

A job calls :func:`report_progress` from anywhere in its code; the executor running it has
installed a sink for the current job (a context variable), so no argument needs threading
through. Reports are kept in memory by the worker and written at most once per
``Worker(progress_interval=...)``, so calling it in a tight loop costs no round trips.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

from chancy.errors import JobValidationError

#: Receives (percent, message) for the job running in the current context.
ProgressSink = Callable[[float, str | None], None]

MAX_MESSAGE_LENGTH = 1000

_sink: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar(
    "chancy_progress_sink", default=None
)


def check_progress(percent: Any, message: Any) -> tuple[float, str | None]:
    """Validate a progress report; raise :class:`JobValidationError` naming the problem."""
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise JobValidationError(f"progress must be a number from 0 to 100, not {percent!r}")
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise JobValidationError(f"progress must be from 0 to 100, not {percent!r}")
    if message is not None:
        if not isinstance(message, str):
            raise JobValidationError(f"progress message must be a str, not {message!r}")
        message = message.replace("\x00", "\ufffd")[:MAX_MESSAGE_LENGTH]
    return float(percent), message


def report_progress(percent: float, message: str | None = None) -> bool:
    """Report how far the running job is (0-100) with an optional message. Returns False
    (and does nothing) when called outside a job run by a worker, e.g. in a unit test."""
    value, text = check_progress(percent, message)
    sink = _sink.get()
    if sink is None:
        return False
    sink(value, text)
    return True


def install_sink(sink: ProgressSink | None) -> contextvars.Token[ProgressSink | None]:
    """Route :func:`report_progress` in the current context to ``sink`` (executors)."""
    return _sink.set(sink)


def reset_sink(token: contextvars.Token[ProgressSink | None]) -> None:
    """Undo :func:`install_sink`."""
    _sink.reset(token)
