"""What every executor shares: the slot accounting, one-report-per-job bookkeeping and the
code that imports and calls a job's function (also used inside child processes)."""

from __future__ import annotations

import abc
import asyncio
import contextvars
import dataclasses
import enum
import functools
import importlib
import inspect
import traceback
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chancy.errors import JobImportError, Snooze
from chancy.job import QueuedJob, Reference

if TYPE_CHECKING:
    from chancy.queue import Queue
    from chancy.worker import Worker


#: The job whose function runs in the current context (task, thread or child process); set
#: by :func:`prepare_call`, read by :mod:`chancy.contrib.logging` to tag log records.
current_job: contextvars.ContextVar[QueuedJob | None] = contextvars.ContextVar(
    "chancy_current_job", default=None
)


class Kind(enum.StrEnum):
    """How an execution ended."""

    SUCCEEDED = "succeeded"
    ERROR = "error"  # the function raised
    TIMEOUT = "timeout"  # Limit.Type.TIME was exceeded
    DIED = "died"  # the process running it died
    CANCELLED = "cancelled"  # Chancy.cancel_job
    INTERRUPTED = "interrupted"  # worker shutdown: hand back without using the attempt
    SNOOZED = "snoozed"  # the job raised Snooze(delay)


@dataclasses.dataclass(slots=True)
class Execution:
    """An executor's report on one job."""

    job: QueuedJob
    kind: Kind
    result: Any = None
    error: str | None = None
    meta: dict[str, Any] | None = None
    delay: float = 0.0


class Executor(abc.ABC):
    """Runs claimed jobs for one queue with at most ``concurrency`` at a time.

    Subclasses implement :meth:`start_job` and may override :meth:`interrupt`; they call
    :meth:`report` exactly when a job ends. Only the first report of a job counts, so a
    timed-out or cancelled job's late result is discarded.
    """

    default_concurrency = 4

    def __init__(
        self, worker: Worker, queue: Queue, concurrency: int | None = None, **options: Any
    ) -> None:
        self.worker = worker
        self.queue = queue
        self.concurrency = concurrency or queue.concurrency or self.default_concurrency
        self.options = options
        self.running: dict[Reference, QueuedJob] = {}
        self._deadlines: dict[Reference, asyncio.TimerHandle] = {}
        self.slot_freed = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def free_slots(self) -> int:
        """How many more jobs this executor can take now."""
        return self.concurrency - len(self.running)

    async def push(self, job: QueuedJob) -> None:
        """Start ``job``; returns once it is running (not once it ends)."""
        self.running[job.id] = job
        self.idle.clear()
        try:
            await self.start_job(job)
        except asyncio.CancelledError:
            # Stopped while starting (the queue is being reconfigured): hand it back.
            self.report(job, Kind.INTERRUPTED, error=interrupt_message(Kind.INTERRUPTED, job))
            raise
        except Exception:
            self.report(job, Kind.ERROR, error=traceback.format_exc())

    @abc.abstractmethod
    async def start_job(self, job: QueuedJob) -> None:
        """Begin running ``job`` in this executor's way."""

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        """Stop a running job (cancel, time limit or shutdown). The default cannot
        pre-empt the code: it reports now and discards the job's late result."""
        job = self.running.get(ref)
        if job is not None:
            self.report(job, kind, error=interrupt_message(kind, job))

    async def interrupt_all(self, kind: Kind) -> None:
        """Interrupt every running job."""
        for ref in list(self.running):
            await self.interrupt(ref, kind)

    def set_deadline(self, job: QueuedJob, seconds: float) -> None:
        """Interrupt ``job`` with a TIMEOUT if it is still running after ``seconds``."""
        loop = asyncio.get_running_loop()
        self._deadlines[job.id] = loop.call_later(
            seconds, lambda: asyncio.ensure_future(self.interrupt(job.id, Kind.TIMEOUT))
        )

    def report(self, job: QueuedJob, kind: Kind, **fields: Any) -> bool:
        """Record how ``job`` ended; False (and ignored) if it was already reported, or
        if this is a late report of an earlier attempt whose retry now runs here."""
        if self.running.get(job.id) is not job:
            return False
        del self.running[job.id]
        timer = self._deadlines.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        self.worker.on_execution(self, Execution(job, kind, **fields))
        self.slot_freed.set()
        if not self.running:
            self.idle.set()
        return True

    async def stop(self) -> None:
        """Release resources once no job runs (or all were interrupted)."""
        return None


def interrupt_message(kind: Kind, job: QueuedJob) -> str:
    if kind is Kind.TIMEOUT:
        return f"chancy.errors.JobTimeoutError: {job.func} exceeded its time limit"
    if kind is Kind.CANCELLED:
        return f"chancy.errors.JobCancelledError: {job.func} was cancelled"
    return f"chancy.errors.JobCancelledError: {job.func} was interrupted by worker shutdown"


def time_limit(job: QueuedJob) -> float | None:
    """The job's TIME limit in seconds, if any."""
    values = [limit.value for limit in job.limits if limit.type == "time"]
    return min(values) if values else None


def memory_limit(job: QueuedJob) -> int | None:
    """The job's MEMORY limit in bytes, if any."""
    values = [int(limit.value) for limit in job.limits if limit.type == "memory"]
    return min(values) if values else None


@functools.lru_cache(maxsize=1024)
def import_function(path: str) -> Callable[..., Any]:
    """Import ``module.qualname`` (or ``module:qualname``); raises JobImportError."""
    if ":" in path:
        module_name, _, qualname = path.partition(":")
        candidates = [(module_name, qualname)]
    else:
        parts = path.split(".")
        candidates = [
            (".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)
        ]
    last_error: BaseException | None = None
    for module_name, qualname in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and not module_name.startswith(exc.name):
                raise JobImportError(f"importing {module_name} for {path} failed: {exc}") from exc
            last_error = exc
            continue
        try:
            for attribute in qualname.split("."):
                obj = getattr(obj, attribute)
        except AttributeError as exc:
            raise JobImportError(f"{module_name} has no {qualname} (job {path})") from exc
        if not callable(obj):
            raise JobImportError(f"{path} is not callable")
        return typing.cast(Callable[..., Any], obj)
    raise JobImportError(f"cannot import job function {path}: {last_error}")


@functools.lru_cache(maxsize=1024)
def job_parameter(func: Callable[..., Any]) -> str | None:
    """Name of the keyword-only parameter annotated ``QueuedJob``, if ``func`` has one."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    for name, param in signature.parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        annotation = param.annotation
        if annotation is QueuedJob or annotation in ("QueuedJob", "chancy.QueuedJob"):
            return name
        if isinstance(annotation, str) and annotation.endswith("QueuedJob"):
            return name
    return None


def prepare_call(job: QueuedJob) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function to call and its keyword arguments (including the running job)."""
    current_job.set(job)
    func = import_function(job.func)
    kwargs = dict(job.kwargs)
    name = job_parameter(func)
    if name is not None:
        kwargs[name] = job
    return func, kwargs


def classify_exception(exc: BaseException) -> tuple[Kind, float]:
    """Map an exception raised by a job to how the execution ended."""
    if isinstance(exc, Snooze):
        return Kind.SNOOZED, exc.delay
    return Kind.ERROR, 0.0
