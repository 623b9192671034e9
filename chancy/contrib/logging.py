"""Structured logging: tag every log record emitted while a job runs with the job's id,
queue, function and attempt.

The running job is tracked in a context variable set by the executors (in the worker's
tasks and threads, and in the Process executor's children). Either attach
:class:`JobContextFilter` to your handlers, or call :func:`install` once to add the
attributes to every record::

    handler.addFilter(JobContextFilter())
    handler.setFormatter(logging.Formatter("%(chancy_job_id)s %(chancy_func)s %(message)s"))

The attributes are ``chancy_job_id``, ``chancy_queue``, ``chancy_func`` and
``chancy_attempt`` (``None`` outside a job). Child processes of the Process executor do not
inherit the worker's logging set-up: configure it there with the queue's ``initializer``
executor option, e.g. ``executor_options={"initializer": "myapp.logs.setup"}``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from chancy.executors.base import current_job

__all__ = ["JobContextFilter", "install", "job_context"]

FIELDS = ("chancy_job_id", "chancy_queue", "chancy_func", "chancy_attempt")


def job_context() -> dict[str, Any]:
    """The job fields of the current context (all ``None`` outside a job)."""
    job = current_job.get()
    if job is None:
        return dict.fromkeys(FIELDS)
    return {
        "chancy_job_id": str(job.id),
        "chancy_queue": job.queue,
        "chancy_func": job.func,
        "chancy_attempt": job.attempts,
    }


def _tag(record: logging.LogRecord) -> None:
    for key, value in job_context().items():
        if not hasattr(record, key):
            setattr(record, key, value)


class JobContextFilter(logging.Filter):
    """Adds the running job's fields to each record; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        _tag(record)
        return True


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Wrap the log record factory so that every record in this process carries the job
    fields (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _tag(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
