"""Every exception Chancy raises derives from :class:`ChancyError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chancy.job import QueuedJob


class ChancyError(Exception):
    """Root of all Chancy errors; catch this to catch any of them."""


class ConfigurationError(ChancyError, ValueError):
    """A Chancy, Worker or plugin was constructed with invalid settings."""


class InvalidNameError(ChancyError, ValueError):
    """A queue name, table prefix or function path is not acceptable."""


class JobValidationError(ChancyError, ValueError):
    """A job field (priority, attempts, limits, scheduled_at...) is invalid."""


class JobArgumentsError(JobValidationError, TypeError):
    """A job's kwargs or meta cannot be encoded as JSON (``path`` names the offending
    value, e.g. ``kwargs['a'][3]``), or its kwargs do not fit the signature of its
    (importable) function: an unknown name or a missing required one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class QueueValidationError(ChancyError, ValueError):
    """A queue field (concurrency, polling interval, executor...) is invalid."""


class UnknownQueueError(ChancyError, LookupError):
    """A job was pushed to a queue that has never been declared."""

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        names = ", ".join(repr(q) for q in queues)
        super().__init__(
            f"unknown queue {names}: declare it with Chancy.declare(Queue(...)) first, "
            "or construct Chancy(require_declared_queues=False)"
        )


class MigrationsNeededError(ChancyError):
    """The database schema is older than this version of Chancy expects."""


class MigrationPermissionError(ChancyError, PermissionError):
    """The database role may not change the schema: run migrations as the role that owns
    Chancy's tables; workers and applications need only DML rights."""


class NotConnectedError(ChancyError, RuntimeError):
    """A method that needs the connection pool was used outside ``async with chancy``."""


class UnsupportedExecutorError(ChancyError, RuntimeError):
    """The requested executor cannot run on this Python or platform."""


class JobImportError(ChancyError, ImportError):
    """A job's function could not be imported by the worker."""


class JobTimeoutError(ChancyError, TimeoutError):
    """A job ran past its ``Limit.Type.TIME`` limit and was stopped or abandoned."""


class JobCancelledError(ChancyError):
    """A running job was cancelled by ``Chancy.cancel_job`` or by worker shutdown."""


class WorkerDiedError(ChancyError):
    """The process running a job died before reporting an outcome."""


class Snooze(ChancyError):
    """Raise from a job to run it again after ``delay`` seconds without using an attempt."""

    def __init__(self, delay: float) -> None:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay < float("inf")
        ):
            raise JobValidationError(f"Snooze delay must be a finite number >= 0, not {delay!r}")
        self.delay = float(delay)
        super().__init__(f"snoozed for {self.delay} s")


class CronValidationError(ChancyError, ValueError):
    """A cron schedule is invalid: a bad expression or time zone, or a job without a
    ``unique_key``. Raised by ``Cron.schedule`` before any SQL runs."""


class WorkflowValidationError(ChancyError, ValueError):
    """A workflow cannot be pushed: a duplicate or invalid step id, a dependency on an
    unknown step, or a dependency cycle (the message names the steps)."""


class DuplicateStepError(WorkflowValidationError):
    """Two steps (or a step and a group) of one workflow share an id."""


class UnknownDependencyError(WorkflowValidationError, LookupError):
    """A workflow step depends on a step or group id the workflow does not have."""


class WorkflowCycleError(WorkflowValidationError):
    """A workflow's dependencies form a cycle, so some steps could never start."""


class JobNotFoundError(ChancyError, LookupError):
    """The job does not exist: it was never pushed, or it was deleted (pruned, purged)."""


class JobNotFinishedError(ChancyError):
    """The job has no result yet: it is pending, running or waiting to be retried."""


class JobFailedError(ChancyError):
    """The job failed or was cancelled, so it has no result; ``job`` holds its errors."""

    def __init__(self, job: QueuedJob) -> None:
        self.job = job
        last = job.errors[-1]["traceback"].strip().splitlines()[-1] if job.errors else ""
        super().__init__(f"job {job.id} {job.state.value}" + (f": {last}" if last else ""))


class ResultTooLargeError(ChancyError):
    """A job returned a result whose JSON is larger than ``Chancy(max_result_size=...)``;
    the job is recorded as failed with this error (and not retried)."""


class ClaimLostError(ChancyError):
    """A job's claim no longer held when it tried to commit its completion (it was
    cancelled, recovered or timed out meanwhile); its transaction was rolled back."""
