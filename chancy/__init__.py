"""Chancy: a PostgreSQL-backed job queue for Python."""

from chancy.app import Chancy
from chancy.errors import ChancyError, Snooze
from chancy.job import Job, JobFunction, Limit, QueuedJob, Reference, job
from chancy.progress import report_progress
from chancy.queue import Queue
from chancy.store import PushResult
from chancy.worker import Worker

__all__ = [
    "Chancy",
    "ChancyError",
    "Job",
    "JobFunction",
    "Limit",
    "PushResult",
    "Queue",
    "QueuedJob",
    "Reference",
    "Snooze",
    "Worker",
    "job",
    "report_progress",
]
__version__ = "0.1.0"
