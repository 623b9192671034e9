"""What every executor shares: the slot accounting, one-report-per-job bookkeeping and the
code that imports and calls a job's function (also used inside child processes)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import functools
import importlib
import inspect
import threading
import time
import traceback
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from chancy.errors import (
    ConfigurationError,
    JobImportError,
    JobTimeoutError,
    Snooze,
    UnsupportedExecutorError,
    WorkerDiedError,
)
from chancy.job import QueuedJob, Reference
from chancy.progress import ProgressSink

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
    #: Import paths of the raised exception's class and its bases (for retry_on).
    exception: list[str] | None = None
    #: The outcome was already committed (in the job's own transaction).
    recorded: bool = False


class Executor(abc.ABC):
    """Runs claimed jobs for one queue with at most ``concurrency`` at a time.

    Subclasses implement :meth:`start_job` and may override :meth:`interrupt`; they call
    :meth:`report` exactly when a job ends. Only the first report of a job counts, so a
    timed-out or cancelled job's late result is discarded.
    """

    default_concurrency = 4
    #: Jobs claimed beyond ``concurrency`` and held locally until a slot frees, as a
    #: multiple of ``concurrency`` (see :attr:`prefetch`; the ``prefetch`` option sets
    #: the count instead).
    default_prefetch_factor = 0
    #: Without a ``prefetch`` option and with a factor of 0, the executor prefetches
    #: ``SHORT_JOB_PREFETCH x concurrency`` jobs while its jobs are short: while it
    #: finishes at least this many jobs per slot per second (each takes ~1/PACE s or
    #: less), so that claims are large and the next one overlaps running the current
    #: jobs. A prefetched job then waits about SHORT_JOB_PREFETCH / PACE s at most;
    #: slow jobs are never held back.
    SHORT_JOB_PACE = 10.0
    SHORT_JOB_PREFETCH = 2
    #: How often (seconds) the pace is measured.
    PACE_PERIOD = 0.05

    def __init__(
        self, worker: Worker, queue: Queue, concurrency: int | None = None, **options: Any
    ) -> None:
        self.worker = worker
        self.queue = queue
        self.concurrency = concurrency or queue.concurrency or self.default_concurrency
        self.options = options
        prefetch = options.get("prefetch", self.default_prefetch_factor * self.concurrency)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigurationError(f"prefetch must be an int >= 0, not {prefetch!r}")
        self._fixed_prefetch = prefetch
        self._adaptive = "prefetch" not in options and self.default_prefetch_factor == 0
        self._short_jobs = False
        self._finished = 0
        self._pace_since: float | None = None
        #: Claimed jobs, started or waiting in the prefetch buffer.
        self.running: dict[Reference, QueuedJob] = {}
        # Insertion-ordered (FIFO); keyed so that a job cancelled while it waits leaves
        # in O(1).
        self._buffer: dict[Reference, QueuedJob] = {}
        self._starting: set[asyncio.Future[None]] = set()
        self._filling = False
        self._deadlines: dict[Reference, asyncio.TimerHandle] = {}
        self._progress_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.slot_freed = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def prefetch(self) -> int:
        """How many claimed jobs may wait here for a free slot. They are ``running`` in
        the database (claimed by this worker, heartbeated, recovered if it dies) but not
        started: their time limit starts when they do, a cancellation or a shutdown
        hands them back at once. It lets one fetch refill several slots, and the next
        claim overlap the current jobs (see :attr:`SHORT_JOB_PACE`)."""
        if not self._adaptive:
            return self._fixed_prefetch
        now = time.monotonic()
        if self._pace_since is None:
            self._pace_since = now
        elif now - self._pace_since >= self.PACE_PERIOD:
            pace = self._finished / (now - self._pace_since) / self.concurrency
            self._short_jobs = pace >= self.SHORT_JOB_PACE
            self._finished = 0
            self._pace_since = now
        return self.SHORT_JOB_PREFETCH * self.concurrency if self._short_jobs else 0

    @property
    def capacity(self) -> int:
        """How many claimed jobs this executor holds at most: running plus prefetched."""
        return self.concurrency + self.prefetch

    @property
    def free_slots(self) -> int:
        """How many more jobs this executor can take now (prefetch included)."""
        return self.capacity - len(self.running)

    @property
    def buffered(self) -> int:
        """Claimed jobs waiting in the prefetch buffer for a slot."""
        return len(self._buffer)

    async def gather_free_slots(self, wanted: int, window: float) -> None:
        """While jobs still run, wait up to ``window`` seconds for ``wanted`` free slots,
        so that one fetch refills many slots instead of one round trip per finished job."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        while self.running and self.free_slots < wanted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot_freed.wait(), remaining)

    async def push(self, job: QueuedJob) -> None:
        """Start ``job`` (or hold it in the prefetch buffer while every slot is busy);
        returns once it is running or buffered (not once it ends)."""
        self.running[job.id] = job
        self.idle.clear()
        if len(self.running) - len(self._buffer) > self.concurrency:
            self._buffer[job.id] = job
            return
        if not self._start_nowait(job):
            await self._start(job)

    async def _start(self, job: QueuedJob) -> None:
        if self.running.get(job.id) is not job:
            return  # reported (cancelled, handed back) while it waited in the buffer
        try:
            await self.start_job(job)
        except asyncio.CancelledError:
            # Stopped while starting (the queue is being reconfigured): hand it back.
            self.report(job, Kind.INTERRUPTED, error=interrupt_message(Kind.INTERRUPTED, job))
            raise
        except Exception:
            self.report(job, Kind.ERROR, error=traceback.format_exc())

    def _start_nowait(self, job: QueuedJob) -> bool:
        try:
            return self.start_job_nowait(job)
        except Exception:
            self.report(job, Kind.ERROR, error=traceback.format_exc())
            return True

    @abc.abstractmethod
    async def start_job(self, job: QueuedJob) -> None:
        """Begin running ``job`` in this executor's way."""

    def start_job_nowait(self, job: QueuedJob) -> bool:
        """Begin running ``job`` without awaiting anything, if this executor can (then
        True); False makes the caller await :meth:`start_job` instead."""
        return False

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        """Stop a running job (cancel, time limit or shutdown). The default cannot
        pre-empt the code: it reports now and discards the job's late result."""
        job = self.running.get(ref)
        if job is not None:
            self.report(job, kind, error=interrupt_message(kind, job))

    async def interrupt_all(self, kind: Kind) -> None:
        """Interrupt every running job."""
        self.release_buffered()
        for ref in list(self.running):
            await self.interrupt(ref, kind)

    def release_buffered(self) -> None:
        """Hand back every prefetched job not started yet (worker shutdown): reported
        INTERRUPTED, so it returns to the queue without using up its attempt."""
        while self._buffer:
            job = self._take_buffered()
            self.report(job, Kind.INTERRUPTED, error=interrupt_message(Kind.INTERRUPTED, job))

    def _take_buffered(self) -> QueuedJob:
        """The oldest job of the prefetch buffer, taken out of it."""
        return self._buffer.pop(next(iter(self._buffer)))

    def _buffer_first(self, jobs: Iterable[QueuedJob]) -> None:
        """Put ``jobs`` back at the front of the prefetch buffer, in their order."""
        front = {job.id: job for job in jobs}
        if front:
            front.update(self._buffer)
            self._buffer = front

    def _fill_slots(self) -> None:
        """Start buffered jobs while slots are free (hand them back once stopping)."""
        if self._filling:
            return
        self._filling = True
        try:
            while self._buffer and len(self.running) - len(self._buffer) < self.concurrency:
                if self.worker.stopping.is_set():
                    self.release_buffered()
                    return
                job = self._take_buffered()
                if self._start_nowait(job):
                    continue
                started = asyncio.ensure_future(self._start(job))
                self._starting.add(started)
                started.add_done_callback(self._starting.discard)
        finally:
            self._filling = False

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
        if fields.get("exception") is None:
            fields["exception"] = kind_exception(kind)
        del self.running[job.id]
        self._finished += 1
        if self._buffer:
            self._buffer.pop(job.id, None)  # cancelled before it started
        timer = self._deadlines.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        self.worker.on_execution(self, Execution(job, kind, **fields))
        if self._buffer:
            self._fill_slots()
        self.slot_freed.set()
        if not self.running:
            self.idle.set()
        return True

    async def stop(self) -> None:
        """Release resources once no job runs (or all were interrupted)."""
        return None

    def progress_sink(self, job: QueuedJob) -> ProgressSink:
        """A sink for :func:`chancy.report_progress` calls made while ``job`` runs, from
        the event loop or from any thread. Reports from threads are coalesced: at most
        one hop to the loop is pending per job, carrying the latest report."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return _JobProgressSink(self, job)


class _JobProgressSink:
    """The progress sink of one running job (see :meth:`Executor.progress_sink`). Made for
    every job, so it only holds references: the cost falls on the reports."""

    __slots__ = ("executor", "job", "latest")

    def __init__(self, executor: Executor, job: QueuedJob) -> None:
        self.executor = executor
        self.job = job
        self.latest: tuple[float, str | None] | None = None

    def __call__(self, percent: float, message: str | None) -> None:
        executor = self.executor
        if threading.get_ident() == executor._loop_thread:
            executor.worker.set_progress(self.job, percent, message)
            return
        with executor._progress_lock:
            scheduled = self.latest is not None
            self.latest = (percent, message)
        if not scheduled and executor._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                executor._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.executor._progress_lock:
            report, self.latest = self.latest, None
        if report is not None:
            self.executor.worker.set_progress(self.job, *report)


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
        except Exception as exc:  # the module itself raised while being imported
            raise JobImportError(f"importing {module_name} for {path} raised {exc!r}") from exc
        try:
            for attribute in qualname.split("."):
                obj = getattr(obj, attribute)
        except AttributeError as exc:
            raise JobImportError(f"{module_name} has no {qualname} (job {path})") from exc
        if not callable(obj):
            raise JobImportError(f"{path} is not callable")
        return typing.cast(Callable[..., Any], obj)
    raise JobImportError(f"cannot import job function {path}: {last_error}")


#: What a keyword-only parameter may ask for, by the annotation's (last) name.
_INJECTABLE = {
    "QueuedJob": "job",
    "AsyncConnection": "async_connection",
    "Connection": "connection",
}


def _annotation_name(annotation: Any) -> str | None:
    if isinstance(annotation, str):
        # An annotation that could not be evaluated: trust only unambiguous spellings.
        text = annotation.split("[", 1)[0].strip()
        if text.endswith("QueuedJob"):
            return "QueuedJob"
        if text in ("psycopg.AsyncConnection", "psycopg.Connection"):
            return text.rpartition(".")[2]
        return None
    origin = typing.get_origin(annotation) or annotation
    name: str | None = getattr(origin, "__name__", None)
    module: str = getattr(origin, "__module__", "") or ""
    if name == "QueuedJob" and origin is QueuedJob:
        return name
    if name in ("AsyncConnection", "Connection") and module.startswith("psycopg"):
        return name
    return None


@functools.lru_cache(maxsize=1024)
def injected_parameters(func: Callable[..., Any]) -> dict[str, str]:
    """Keyword-only parameters the executor fills in, by name: ``"job"`` (annotated
    ``QueuedJob``), ``"async_connection"`` (``psycopg.AsyncConnection``) or
    ``"connection"`` (``psycopg.Connection``)."""
    try:
        signature = inspect.signature(func, eval_str=True)
    except Exception:  # an annotation that does not evaluate: read the strings
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            return {}
    found: dict[str, str] = {}
    for name, param in signature.parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        kind = _INJECTABLE.get(_annotation_name(param.annotation) or "")
        if kind is not None:
            found[name] = kind
    return found


def job_parameter(func: Callable[..., Any]) -> str | None:
    """Name of the keyword-only parameter annotated ``QueuedJob``, if ``func`` has one."""
    for name, kind in injected_parameters(func).items():
        if kind == "job":
            return name
    return None


def connection_parameter(func: Callable[..., Any]) -> tuple[str, str] | None:
    """(name, kind) of the parameter asking for a database connection, if any."""
    for name, kind in injected_parameters(func).items():
        if kind != "job":
            return name, kind
    return None


def prepare_call(
    job: QueuedJob, connection: tuple[str, Any] | None = None
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function to call and its keyword arguments (the running job, and the
    connection for a job completed in its own transaction)."""
    current_job.set(job)
    func = import_function(job.func)
    kwargs = dict(job.kwargs)
    for name, kind in injected_parameters(func).items():
        if kind == "job":
            kwargs[name] = job
        elif connection is not None and connection[0] == name:
            kwargs[name] = connection[1]
        else:
            wanted = "psycopg." + (
                "AsyncConnection" if kind == "async_connection" else "Connection"
            )
            raise UnsupportedExecutorError(
                f"{job.func} asks for a {wanted} (parameter {name!r}): run it on a queue "
                "with the Async executor (async functions, psycopg.AsyncConnection) or the "
                "Threaded executor (plain functions, psycopg.Connection)"
            )
    return func, kwargs


@functools.lru_cache(maxsize=1024)
def is_async(func: Callable[..., Any]) -> bool:
    """True for coroutine functions, including ones wrapped by ``@job``."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "func", None)
    )


def classify_exception(exc: BaseException) -> tuple[Kind, float]:
    """Map an exception raised by a job to how the execution ended."""
    if isinstance(exc, Snooze):
        return Kind.SNOOZED, exc.delay
    return Kind.ERROR, 0.0


def exception_types(exc: BaseException | type[BaseException]) -> list[str]:
    """Import paths of an exception's class and its bases, most specific first; they
    travel as plain strings (also over a process pipe) for ``retry_on`` matching."""
    carried = getattr(exc, "chancy_exception_types", None)
    if isinstance(carried, list):
        return carried
    cls = exc if isinstance(exc, type) else type(exc)
    return [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__ if c is not object]


def kind_exception(kind: Kind) -> list[str] | None:
    """The exception types that stand for an execution that ended without raising in
    the job's own code (a time limit, a dead process)."""
    if kind is Kind.TIMEOUT:
        return exception_types(JobTimeoutError)
    if kind is Kind.DIED:
        return exception_types(WorkerDiedError)
    return None
