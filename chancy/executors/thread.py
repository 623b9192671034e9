"""Run jobs in threads.

A thread cannot be pre-empted: when a job passes its time limit or is cancelled, it is
recorded as timed out/cancelled at once, its slot is freed and whatever it returns later is
discarded, but the thread itself runs on until the function returns. The pool grows past
``concurrency`` threads when abandoned threads are still busy, so they never block new jobs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

from psycopg_pool import ConnectionPool

from chancy import store as store_module
from chancy.errors import ClaimLostError
from chancy.executors.base import (
    Executor,
    Kind,
    classify_exception,
    connection_parameter,
    exception_types,
    import_function,
    is_async,
    prepare_call,
    time_limit,
)
from chancy.job import QueuedJob
from chancy.progress import ProgressSink, install_sink, reset_sink

Task = Callable[[], None]


class ElasticThreadPool:
    """Threads that wait for tasks; a new one starts whenever none is idle."""

    def __init__(self, name: str, idle_timeout: float = 60.0) -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle_timeout = idle_timeout

    def submit(self, task: Task) -> None:
        """Run ``task`` on an idle thread, or on a new one."""
        with self._lock:
            start_new = self._idle == 0
            if not start_new:
                self._idle -= 1
                self._tasks.put(task)
        if start_new:
            thread = threading.Thread(target=self._loop, args=(task,), daemon=True)
            thread.name = f"{self._name}-{len(self._threads)}"
            self._threads.add(thread)
            thread.start()

    def _loop(self, task: Task | None) -> None:
        try:
            while task is not None:
                task()
                with self._lock:
                    self._idle += 1
                try:
                    task = self._tasks.get(timeout=self._idle_timeout)
                except queue.Empty:
                    with self._lock:
                        # A submit may have counted on us meanwhile; then serve it.
                        if self._tasks.empty():
                            self._idle -= 1
                            return
                    task = self._tasks.get()
        finally:
            self._threads.discard(threading.current_thread())

    def shutdown(self) -> None:
        """Let idle threads exit; busy ones finish their task first."""
        with self._lock:
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._tasks.put(None)


class ThreadedExecutor(Executor):
    """Each job runs in a pooled thread of the worker process. A plain function with a
    keyword-only parameter annotated ``psycopg.Connection`` gets a connection in a
    transaction that also commits its completion (see docs/results.md). Option
    ``prefetch``: claimed jobs held for the next free thread (default 3 x concurrency;
    0 claims only as many jobs as there are idle threads)."""

    default_concurrency = 8
    #: A finished job's thread picks up the next one without waiting for a fetch.
    default_prefetch_factor = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ElasticThreadPool(f"chancy-{self.queue.name}")
        self._connections: ConnectionPool | None = None
        self._connections_lock = threading.Lock()

    async def start_job(self, job: QueuedJob) -> None:
        loop = asyncio.get_running_loop()
        seconds = time_limit(job)
        if seconds is not None:
            self.set_deadline(job, seconds)
        sink = self.progress_sink(job)
        self._pool.submit(lambda: self._run(loop, job, sink))

    def _run(self, loop: asyncio.AbstractEventLoop, job: QueuedJob, sink: ProgressSink) -> None:
        fields: dict[str, Any]
        token = install_sink(sink)
        try:
            result, recorded = self._call(loop, job)
        except BaseException as exc:
            kind, delay = classify_exception(exc)
            fields = {
                "error": traceback.format_exc(),
                "delay": delay,
                "exception": exception_types(exc),
            }
        else:
            kind, fields = Kind.SUCCEEDED, {"result": result, "recorded": recorded}
        finally:
            reset_sink(token)
        fields["meta"] = dict(job.meta)
        try:
            loop.call_soon_threadsafe(lambda: self.report(job, kind, **fields))
        except RuntimeError:  # the loop closed while the job ran
            pass

    def _call(self, loop: asyncio.AbstractEventLoop, job: QueuedJob) -> tuple[Any, bool]:
        func = import_function(job.func)
        wanted = connection_parameter(func)
        if wanted is not None and wanted[1] == "connection" and not is_async(func):
            return self._call_in_transaction(loop, job, wanted[0]), True
        return self.call(job), False

    def call(self, job: QueuedJob) -> Any:
        """Run the job's function in the current (pool) thread and return its result."""
        func, kwargs = prepare_call(job)
        return func(**kwargs)

    def _call_in_transaction(
        self, loop: asyncio.AbstractEventLoop, job: QueuedJob, parameter: str
    ) -> Any:
        """Like the Async executor's: the job's work and its completion commit together."""
        worker = self.worker
        with self._connection_pool().connection() as conn, conn.transaction():
            func, kwargs = prepare_call(job, (parameter, conn))
            result = func(**kwargs)
            future = asyncio.run_coroutine_threadsafe(
                worker.prepare_committed_outcome(job, result, dict(job.meta)), loop
            )
            outcome = future.result(timeout=60)
            held = store_module.run(
                conn, worker.chancy.store.complete_jobs(worker.worker_id, [outcome])
            )
            if job.id not in held:
                raise ClaimLostError(f"{job.func}: the claim on job {job.id} was lost")
        return result

    def _connection_pool(self) -> ConnectionPool:
        with self._connections_lock:
            if self._connections is None:
                chancy = self.worker.chancy
                self._connections = ConnectionPool(
                    chancy.dsn,
                    min_size=0,
                    max_size=self.concurrency,
                    kwargs=chancy._connection_kwargs(),
                    configure=chancy._configure_sync,
                    open=True,
                    name=f"chancy-jobs-{self.queue.name}",
                )
            return self._connections

    async def stop(self) -> None:
        self._pool.shutdown()
        with self._connections_lock:
            pool, self._connections = self._connections, None
        if pool is not None:
            await asyncio.to_thread(pool.close)
