"""Run jobs in a pool of long-lived child processes (the default executor).

Each child owns a pipe to the worker and runs one job at a time; messages are JSON, never
pickle. A child that dies (``os._exit``, a segfault, the OOM killer) fails only the job it
was running ("worker died"), and only that child is replaced: the jobs in its siblings are
unaffected. Time limits raise :class:`~chancy.errors.JobTimeoutError` inside the child via
``SIGALRM``; a child that does not stop within ``kill_grace`` seconds after its deadline,
a cancellation or a shutdown is killed. Memory limits set ``RLIMIT_AS`` for the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

from chancy.errors import JobCancelledError, JobTimeoutError
from chancy.executors.base import (
    Executor,
    Kind,
    classify_exception,
    exception_types,
    import_function,
    interrupt_message,
    memory_limit,
    prepare_call,
    time_limit,
)
from chancy.job import QueuedJob, Reference
from chancy.progress import install_sink, reset_sink

CANCEL_SIGNAL = signal.SIGUSR1
#: The signals a child raises job-ending exceptions from.
_JOB_SIGNALS = {signal.SIGALRM, CANCEL_SIGNAL}


class _Child:
    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Any) -> None:
        self.process = process
        self.conn: multiprocessing.connection.Connection = conn
        self.job: QueuedJob | None = None
        self.kill_timer: asyncio.TimerHandle | None = None
        self.pending_kind: Kind | None = None
        self.jobs_done = 0


class ProcessExecutor(Executor):
    """A pool of ``concurrency`` child processes (CPU count by default).

    Options: ``start_method`` (``forkserver`` on Linux, else ``spawn``), ``kill_grace``
    seconds (default 5), ``max_jobs_per_child`` (recycle a child after N jobs; default
    never), ``initializer`` (import path of a function each child calls once before its
    first job, e.g. ``chancy.contrib.django.setup_child``), ``prefetch`` (claimed jobs held
    for the next free child; default 3 x concurrency, 0 claims only as many jobs as there
    are idle children).
    """

    default_concurrency = os.cpu_count() or 2
    #: A child that finishes gets the next job without waiting for a fetch.
    default_prefetch_factor = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        method = self.options.get("start_method") or (
            "forkserver" if sys.platform.startswith("linux") else "spawn"
        )
        self._context = multiprocessing.get_context(method)
        self._kill_grace = float(self.options.get("kill_grace", 5))
        self._max_jobs = self.options.get("max_jobs_per_child")
        self._idle: list[_Child] = []
        self._busy: dict[Reference, _Child] = {}
        self._closing = False

    def _discard(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_reader(child.conn.fileno())
        if child.kill_timer is not None:
            child.kill_timer.cancel()
        with contextlib.suppress(Exception):
            if child.process.is_alive():
                child.process.kill()
        with contextlib.suppress(Exception):
            child.conn.close()
        if child in self._idle:
            self._idle.remove(child)

    async def start_job(self, job: QueuedJob) -> None:
        child = self._idle.pop() if self._idle else await asyncio.to_thread(self._spawn_sync)
        if self.running.get(job.id) is not job:
            # Cancelled or interrupted while the child started: it was reported already.
            self._idle.append(child)
            return
        child.job = job
        child.pending_kind = None
        self._busy[job.id] = child
        seconds = time_limit(job)
        message = {
            "id": job.id.identifier,
            "func": job.func,
            "kwargs": job.kwargs,
            "meta": job.meta,
            "queue": job.queue,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "priority": job.priority,
            "time_limit": seconds,
            "memory_limit": memory_limit(job),
        }
        if seconds is not None:
            # The child raises at the deadline itself; this is the backstop if it cannot.
            loop = asyncio.get_running_loop()
            child.kill_timer = loop.call_later(
                seconds + self._kill_grace, self._kill, child, Kind.TIMEOUT
            )
        payload = json.dumps(message, default=str).encode()
        try:
            child.conn.send_bytes(payload)
        except OSError:
            # An idle child that died meanwhile: the job never reached it, so it gets a
            # fresh child rather than a "worker died" that would use up an attempt.
            child.job = None
            self._busy.pop(job.id, None)
            self._discard(child)
            child = await asyncio.to_thread(self._spawn_sync)
            child.job = job
            self._busy[job.id] = child
            child.conn.send_bytes(payload)

    def _spawn_sync(self) -> _Child:
        # Runs in a thread so that start-up never blocks the event loop; the reader is
        # registered back on the loop thread.
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(  # type: ignore[attr-defined]
            target=child_main,
            args=(child_conn, list(sys.path), os.getpid(), self.options.get("initializer")),
            name=f"chancy-{self.queue.name}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        child = _Child(process, parent_conn)
        self._register(child)
        return child

    def _register(self, child: _Child) -> None:
        loop = self.worker.loop
        loop.call_soon_threadsafe(loop.add_reader, child.conn.fileno(), self._on_readable, child)

    def _on_readable(self, child: _Child) -> None:
        try:
            data = child.conn.recv_bytes()
        except (EOFError, OSError):
            self._child_died(child)
            return
        reply = json.loads(data)
        job = child.job
        if job is None or reply.get("id") != job.id.identifier:
            return
        progress = reply.get("progress")
        if progress is not None:
            self.worker.set_progress(job, progress["percent"], progress.get("message"))
        if "kind" not in reply:  # a progress report: the job runs on
            return
        if child.kill_timer is not None:
            child.kill_timer.cancel()
            child.kill_timer = None
        self._busy.pop(job.id, None)
        child.job = None
        kind = Kind(reply["kind"])
        if kind is Kind.CANCELLED and child.pending_kind is not None:
            kind = child.pending_kind
        self.report(
            job,
            kind,
            result=reply.get("result"),
            error=reply.get("error"),
            meta=reply.get("meta"),
            delay=float(reply.get("delay") or 0),
            exception=reply.get("exception"),
        )
        child.jobs_done += 1
        recycle = self._max_jobs and child.jobs_done >= self._max_jobs
        if self._closing or recycle:
            self._discard(child)
        else:
            self._idle.append(child)

    def _child_died(self, child: _Child) -> None:
        job = child.job
        self._discard(child)
        if job is None:
            return
        self._busy.pop(job.id, None)
        child.job = None
        kind = child.pending_kind or Kind.DIED
        if kind is Kind.DIED:
            code = child.process.exitcode
            error = (
                f"chancy.errors.WorkerDiedError: the process running {job.func} died "
                f"(exit code {code})"
            )
        else:
            error = interrupt_message(kind, job)
        self.report(job, kind, error=error)

    def _kill(self, child: _Child, kind: Kind) -> None:
        child.pending_kind = child.pending_kind or kind
        with contextlib.suppress(Exception):
            child.process.kill()

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        child = self._busy.get(ref)
        if child is None:
            return await super().interrupt(ref, kind)
        child.pending_kind = kind
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(child.process.pid or 0, CANCEL_SIGNAL)
        if child.kill_timer is not None:
            child.kill_timer.cancel()
        loop = asyncio.get_running_loop()
        child.kill_timer = loop.call_later(self._kill_grace, self._kill, child, kind)
        return None

    def kill_all(self) -> None:
        """Kill every child at once (forced shutdown)."""
        for child in [*self._busy.values(), *self._idle]:
            with contextlib.suppress(Exception):
                child.process.kill()

    async def stop(self) -> None:
        self._closing = True
        for child in list(self._idle):
            self._discard(child)
        for child in list(self._busy.values()):
            self._discard(child)


# -- inside the child process ------------------------------------------------------------


def _raise_cancelled(signum: int, frame: FrameType | None) -> None:
    raise JobCancelledError("job interrupted by its worker")


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise JobTimeoutError("job exceeded its time limit")


def child_main(
    conn: multiprocessing.connection.Connection,
    path: list[str],
    worker_pid: int,
    initializer: str | None = None,
) -> None:
    """Serve jobs sent by the worker over ``conn`` until it closes."""
    sys.path[:] = path
    threading.Thread(target=_exit_with_worker, args=(worker_pid,), daemon=True).start()
    # Ctrl-C and a stop signal sent to the whole process group (as systemd does) are for
    # the worker, which decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(CANCEL_SIGNAL, signal.SIG_IGN)
    if initializer:
        import_function(initializer)()
    resource: Any = None
    with contextlib.suppress(ImportError):
        import resource
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except (EOFError, OSError, KeyboardInterrupt):
            return
        reply = _child_run(message, resource, conn)
        try:
            conn.send_bytes(_encode_reply(reply))
        except OSError:
            return


def _exit_with_worker(worker_pid: int) -> None:
    """Exit as soon as the worker dies: a job must not run on after its worker was
    killed, or it would run twice once another worker recovers it."""
    try:
        pidfd = os.pidfd_open(worker_pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has exited
        os._exit(70)
    while True:
        time.sleep(0.5)
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            os._exit(70)
        except PermissionError:
            pass


class _PipeProgress:
    """Sends a job's progress to the worker at most every ``interval`` seconds; the last
    report not yet sent goes with the job's final reply."""

    def __init__(self, conn: multiprocessing.connection.Connection, job_id: str) -> None:
        self.conn = conn
        self.job_id = job_id
        self.unsent: dict[str, Any] | None = None
        self.last_sent = 0.0
        self.interval = 0.1

    def __call__(self, percent: float, message: str | None) -> None:
        self.unsent = {"percent": percent, "message": message}
        now = time.monotonic()
        if now - self.last_sent >= self.interval:
            self.last_sent = now
            report, self.unsent = self.unsent, None
            payload = json.dumps({"id": self.job_id, "progress": report}).encode()
            # A time limit or cancellation raising in the middle of a write would leave
            # half a message on the pipe: hold those signals until it is written.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
            try:
                with contextlib.suppress(OSError):
                    self.conn.send_bytes(payload)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _child_run(
    message: dict[str, Any],
    resource: Any,
    conn: multiprocessing.connection.Connection | None = None,
) -> dict[str, Any]:
    job = QueuedJob(
        id=Reference(message["id"]),
        func=message["func"],
        queue=message["queue"],
        kwargs=message["kwargs"],
        meta=message["meta"],
        attempts=message["attempts"],
        max_attempts=message["max_attempts"],
        priority=message["priority"],
        state=QueuedJob.State.RUNNING,
    )
    seconds = message.get("time_limit")
    memory = message.get("memory_limit")
    old_limit = None
    reply: dict[str, Any] = {"id": message["id"]}
    signal.signal(CANCEL_SIGNAL, _raise_cancelled)
    progress = _PipeProgress(conn, message["id"]) if conn is not None else None
    token = install_sink(progress)
    try:
        if memory and resource is not None:
            old_limit = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (int(memory), old_limit[1]))
        if seconds:
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, float(seconds))
        func, kwargs = prepare_call(job)
        result = func(**kwargs)
        signal.setitimer(signal.ITIMER_REAL, 0)
        reply.update(kind=Kind.SUCCEEDED.value, result=result)
    except JobTimeoutError:
        reply.update(kind=Kind.TIMEOUT.value, error=traceback.format_exc())
    except JobCancelledError:
        reply.update(kind=Kind.CANCELLED.value, error=traceback.format_exc())
    except BaseException as exc:
        kind, delay = classify_exception(exc)
        reply.update(
            kind=kind.value,
            error=traceback.format_exc(),
            delay=delay,
            exception=exception_types(exc),
        )
    finally:
        reset_sink(token)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(CANCEL_SIGNAL, signal.SIG_IGN)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
    reply["meta"] = dict(job.meta)
    if progress is not None and progress.unsent is not None:
        reply["progress"] = progress.unsent
    return reply


def _encode_reply(reply: dict[str, Any]) -> bytes:
    """Encode once; what JSON cannot hold goes as its repr (the worker stores it so)."""
    try:
        return json.dumps(reply, default=repr).encode()
    except ValueError:  # a circular structure in the result or meta
        reply.update(result=repr(reply.get("result")), meta=repr(reply.get("meta")))
        return json.dumps(reply, default=repr).encode()
