"""Run jobs in threads.

A thread cannot be pre-empted: when a job passes its time limit or is cancelled, it is
recorded as timed out/cancelled at once, its slot is freed and whatever it returns later is
discarded, but the thread itself runs on until the function returns. More threads start
when abandoned ones are still busy, so they never block new jobs.

Claimed jobs wait in a queue that the threads take from themselves: a thread that finishes
a job starts the next one without a trip through the event loop, and finished jobs reach
the loop in batches (one wake-up of the loop for all the jobs that ended meanwhile).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import queue
import threading
import time
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
    interrupt_message,
    is_async,
    prepare_call,
    time_limit,
)
from chancy.job import QueuedJob, Reference
from chancy.progress import install_sink

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


class _Run:
    """A claimed job on its way through the threads; also the progress sink of its
    function (it only runs in a job thread, never on the loop)."""

    __slots__ = ("claimed", "executor", "job", "progress", "seconds")

    def __init__(self, executor: ThreadedExecutor, job: QueuedJob) -> None:
        self.executor = executor
        self.job = job
        self.seconds = time_limit(job) if job.limits else None
        #: When it was handed to the threads (time.monotonic()).
        self.claimed = time.monotonic()
        #: The latest progress report not yet handed to the loop.
        self.progress: tuple[float, str | None] | None = None

    def __call__(self, percent: float, message: str | None) -> None:
        """Coalesce progress reports: at most one hop to the loop pending per job."""
        executor = self.executor
        with executor._progress_lock:
            scheduled = self.progress is not None
            self.progress = (percent, message)
        if not scheduled and executor._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                executor._loop.call_soon_threadsafe(self._deliver_progress)

    def _deliver_progress(self) -> None:
        with self.executor._progress_lock:
            report, self.progress = self.progress, None
        if report is not None:
            self.executor.worker.set_progress(self.job, *report)


class _Sleeper:
    """An idle job thread's wake-up signal: a lock held until a waker releases it."""

    __slots__ = ("signal",)

    def __init__(self) -> None:
        self.signal = threading.Lock()
        self.signal.acquire()


Report = tuple[QueuedJob, Kind, dict[str, Any]]


class ThreadedExecutor(Executor):
    """Each job runs in a pooled thread of the worker process. A plain function with a
    keyword-only parameter annotated ``psycopg.Connection`` gets a connection in a
    transaction that also commits its completion (see docs/results.md). Option
    ``prefetch``: claimed jobs held for the next free thread (a fixed number; 0 claims
    only as many jobs as there are idle threads). Without it the executor sizes it: 3 x
    concurrency, raised while jobs are short to about :attr:`prefetch_horizon` seconds
    of work (at most :attr:`max_prefetch`), so that one fetch feeds many short jobs."""

    default_concurrency = 8
    #: A finished job's thread picks up the next one without waiting for a fetch.
    default_prefetch_factor = 3
    #: Seconds of work (at the recent job duration) the sized prefetch may hold.
    prefetch_horizon = 0.05
    #: The most jobs the sized prefetch holds.
    max_prefetch = 256
    #: Seconds an idle thread waits for work before it exits.
    idle_timeout = 60.0
    #: While jobs flow, the loop looks at the threads this often (seconds): it collects
    #: finished jobs (a thread that goes on to another job leaves its report for this
    #: tick rather than waking the loop), and if claimed jobs have waited this long for
    #: a thread, it wakes one for each of them. Otherwise one awake thread at a time
    #: takes the queue, so that short jobs do not pass the GIL between many threads.
    tick = 0.002

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The prefetch is sized from job durations unless the option fixes it.
        self._min_prefetch = None if "prefetch" in self.options else self._fixed_prefetch
        self._sized_prefetch = self._fixed_prefetch
        #: Recent job duration in seconds (rises quickly, falls slowly); None until a
        #: job has run.
        self._duration: float | None = None
        self._connections: ConnectionPool | None = None
        self._connections_lock = threading.Lock()
        # Shared with the job threads, under _state_lock (but for appends to _waiting
        # from the loop: deque.append is atomic):
        self._state_lock = threading.Lock()
        #: Claimed jobs no thread has started yet (the prefetch buffer).
        self._waiting: collections.deque[_Run] = collections.deque()
        #: Started jobs that hold a slot (not finished, not abandoned), by job id.
        self._started: dict[Reference, _Run] = {}
        #: Threads awake and not running a job (they look at _waiting before sleeping).
        self._searching = 0
        self._sleepers: list[_Sleeper] = []
        self._threads = 0
        self._closed = False
        #: Finished jobs for the loop, and whether a delivery to the loop is scheduled.
        self._reports: list[tuple[_Run, Report]] = []
        self._delivery_scheduled = False
        #: Whether the tick is armed (set on the loop, read by the threads).
        self._ticking = False
        self._kick_scheduled = False

    @property
    def prefetch(self) -> int:
        """Claimed jobs that may wait for a thread (see :class:`ThreadedExecutor`)."""
        return self._sized_prefetch

    @property
    def buffered(self) -> int:
        return len(self._waiting)

    async def push(self, job: QueuedJob) -> None:
        # Every claimed job goes to the threads' queue at once (no buffer on the loop).
        self.running[job.id] = job
        self.idle.clear()
        try:
            self._enqueue(job)
        except Exception:
            self.report(job, Kind.ERROR, error=traceback.format_exc())

    async def start_job(self, job: QueuedJob) -> None:
        self._enqueue(job)

    def _enqueue(self, job: QueuedJob) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # deque.append is atomic; the threads take jobs (popleft) under _state_lock.
        self._waiting.append(_Run(self, job))
        if not self._kick_scheduled:
            # Once the worker has handed over this batch of jobs, not once per job.
            self._kick_scheduled = True
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        """Wake a thread for newly claimed jobs unless one is awake already; the tick
        adds threads if they wait longer (see :attr:`tick`)."""
        self._kick_scheduled = False
        with self._state_lock:
            spawn = self._wake_locked(1)
            arm = not self._ticking and bool(self._waiting)
            self._ticking = self._ticking or arm
        if arm and self._loop is not None:
            self._loop.call_later(self.tick, self._tick)
        self._start_threads(spawn)

    def _start_threads(self, count: int) -> None:
        """Start ``count`` threads (counted by _wake_locked) from the loop."""
        for _ in range(count):
            if not self._spawn():
                self._fail_if_threadless()
                return

    def _fail_if_threadless(self) -> None:
        """No thread could be started: if none runs, fail the waiting jobs rather than
        hold them forever."""
        with self._state_lock:
            if self._threads:
                return
            runs = list(self._waiting)
            self._waiting.clear()
        for run in runs:
            self.report(run.job, Kind.ERROR, error="RuntimeError: cannot start a job thread")

    # -- the job threads (every _locked method runs under _state_lock) ------------------

    def _startable_locked(self) -> int:
        if self._closed or self.worker.stopping.is_set():  # prefetched jobs go back
            return 0
        return min(len(self._waiting), self.concurrency - len(self._started))

    def _wake_locked(self, wanted: int) -> int:
        """Wake sleeping threads until ``wanted`` (at most one per job that can start
        now) are awake and looking for work; returns how many new threads the caller
        must start (outside the lock)."""
        wanted = min(wanted, self._startable_locked())
        spawn = 0
        while self._searching < wanted:
            self._searching += 1
            if self._sleepers:
                self._sleepers.pop().signal.release()
            else:
                self._threads += 1
                spawn += 1
        return spawn

    def _spawn(self) -> bool:
        """Start a job thread (counted by _wake_locked); False if the system refused."""
        thread = threading.Thread(target=self._thread_main, daemon=True)
        thread.name = f"chancy-{self.queue.name}-{self._threads}"
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": the running ones carry on
            with self._state_lock:
                self._threads -= 1
                self._searching -= 1
            return False
        return True

    def _thread_main(self) -> None:
        lock = self._state_lock
        me = _Sleeper()
        lock.acquire()
        try:
            while True:
                while self._startable_locked():
                    run = self._waiting.popleft()
                    self._started[run.job.id] = run
                    self._searching -= 1
                    lock.release()
                    started = time.monotonic()
                    try:
                        report = contextvars.Context().run(self._execute, run)
                    except BaseException:  # not the job's own error: a last resort
                        report = (run.job, Kind.ERROR, {"error": traceback.format_exc()})
                    finally:
                        lock.acquire()
                    self._observe_duration_locked(time.monotonic() - started)
                    if self._started.get(run.job.id) is run:  # else abandoned: slot gone
                        del self._started[run.job.id]
                    self._searching += 1
                    self._reports.append((run, report))
                    if not self._delivery_scheduled and not (
                        self._ticking and self._startable_locked()
                    ):
                        self._delivery_scheduled = True
                        lock.release()
                        try:
                            self._schedule_delivery()
                        finally:
                            lock.acquire()
                self._searching -= 1
                if self._closed:
                    return
                self._sleepers.append(me)
                lock.release()
                woken = me.signal.acquire(timeout=self.idle_timeout)
                lock.acquire()
                if not woken:
                    if me in self._sleepers:  # nobody needs us: retire
                        self._sleepers.remove(me)
                        return
                    me.signal.acquire()  # picked as the wait timed out: take the signal
                # The waker counted us in _searching.
        finally:
            self._threads -= 1
            lock.release()

    def _observe_duration_locked(self, seconds: float) -> None:
        recent = self._duration
        if recent is None:
            self._duration = seconds
        else:  # a slow job shrinks the prefetch at once, fast ones grow it gradually
            self._duration = recent + (seconds - recent) * (0.25 if seconds > recent else 0.03)

    def _size_prefetch(self) -> None:
        """On the loop: hold about prefetch_horizon seconds of work, never less than
        the default (3 x concurrency) nor more than max_prefetch."""
        floor, recent = self._min_prefetch, self._duration
        if floor is None or recent is None:
            return
        wanted = self.concurrency * self.prefetch_horizon / max(recent, 1e-6)
        self._sized_prefetch = max(floor, min(int(wanted), self.max_prefetch))

    def _schedule_delivery(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver_reports)
        except RuntimeError:  # the loop closed while the job ran
            pass

    def _tick(self) -> None:
        """On the loop, while jobs flow: deliver finished jobs and wake threads for jobs
        that waited a tick for one (see :attr:`tick`)."""
        now = time.monotonic()
        with self._state_lock:
            reports, self._reports = self._reports, []
            spawn = 0
            if self._waiting and now - self._waiting[0].claimed >= self.tick:
                spawn = self._wake_locked(self.concurrency)
            self._ticking = bool(reports) or self._startable_locked() > 0
            ticking = self._ticking
        self._start_threads(spawn)
        self._size_prefetch()
        if ticking and self._loop is not None:
            self._loop.call_later(self.tick, self._tick)
        self._report_all(reports)

    def _deliver_reports(self) -> None:
        """On the loop: record every job the threads finished since the last delivery."""
        with self._state_lock:
            reports, self._reports = self._reports, []
            self._delivery_scheduled = False
        self._size_prefetch()
        self._report_all(reports)

    def _report_all(self, reports: list[tuple[_Run, Report]]) -> None:
        for run, (job, kind, fields) in reports:
            # A progress report still on its way to the loop goes first: once the job is
            # recorded, a late one is dropped (the hop and this delivery can come in
            # either order).
            run._deliver_progress()
            self.report(job, kind, **fields)

    def _execute(self, run: _Run) -> Report:
        """Run one job in this thread (in a fresh context); returns how it ended."""
        job = run.job
        if run.seconds is not None:
            self._arm_deadline_threadsafe(run, time.monotonic())
        loop = self._loop
        assert loop is not None
        fields: dict[str, Any]
        install_sink(run)
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
        fields["meta"] = dict(job.meta)
        return job, kind, fields

    def _arm_deadline_threadsafe(self, run: _Run, started: float) -> None:
        """The time limit counts from the moment a thread starts the job."""
        loop = self._loop
        if loop is None:
            return

        def arm() -> None:
            if self.running.get(run.job.id) is run.job and run.seconds is not None:
                elapsed = time.monotonic() - started
                self.set_deadline(run.job, max(run.seconds - elapsed, 0.0))

        try:
            loop.call_soon_threadsafe(arm)
        except RuntimeError:
            pass

    # -- interrupting ---------------------------------------------------------------------

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        """A job not started yet never runs; a started one keeps its thread until it
        returns (a thread cannot be pre-empted) but gives up its slot now."""
        # A job that already ended is recorded as it ended, not as interrupted.
        self._deliver_reports()
        job = self.running.get(ref)
        if job is None:
            return
        spawn = 0
        with self._state_lock:
            for run in self._waiting:
                if run.job is job:
                    self._waiting.remove(run)
                    break
            else:
                started = self._started.get(ref)
                if started is not None and started.job is job:
                    del self._started[ref]
                    spawn = self._wake_locked(1)
        self._start_threads(spawn)
        self.report(job, kind, error=interrupt_message(kind, job))

    def release_buffered(self) -> None:
        with self._state_lock:
            runs = list(self._waiting)
            self._waiting.clear()
        for run in runs:
            job = run.job
            self.report(job, Kind.INTERRUPTED, error=interrupt_message(Kind.INTERRUPTED, job))

    # -- calling the job --------------------------------------------------------------------

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
        """Let idle threads exit (busy ones exit when their job returns); close the
        connections of jobs that commit in their own transaction."""
        with self._state_lock:
            self._closed = True
            sleepers, self._sleepers = self._sleepers, []
            for sleeper in sleepers:
                self._searching += 1
                sleeper.signal.release()
        with self._connections_lock:
            pool, self._connections = self._connections, None
        if pool is not None:
            await asyncio.to_thread(pool.close)
