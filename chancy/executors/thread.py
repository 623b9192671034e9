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

from chancy.executors.base import (
    Executor,
    Kind,
    classify_exception,
    prepare_call,
    time_limit,
)
from chancy.job import QueuedJob

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
    """Each job runs in a pooled thread of the worker process."""

    default_concurrency = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ElasticThreadPool(f"chancy-{self.queue.name}")

    async def start_job(self, job: QueuedJob) -> None:
        loop = asyncio.get_running_loop()
        seconds = time_limit(job)
        if seconds is not None:
            self.set_deadline(job, seconds)
        self._pool.submit(lambda: self._run(loop, job))

    def _run(self, loop: asyncio.AbstractEventLoop, job: QueuedJob) -> None:
        fields: dict[str, Any]
        try:
            result = self.call(job)
        except BaseException as exc:
            kind, delay = classify_exception(exc)
            fields = {"error": traceback.format_exc(), "delay": delay}
        else:
            kind, fields = Kind.SUCCEEDED, {"result": result}
        fields["meta"] = dict(job.meta)
        try:
            loop.call_soon_threadsafe(lambda: self.report(job, kind, **fields))
        except RuntimeError:  # the loop closed while the job ran
            pass

    def call(self, job: QueuedJob) -> Any:
        """Run the job's function in the current (pool) thread and return its result."""
        func, kwargs = prepare_call(job)
        return func(**kwargs)

    async def stop(self) -> None:
        self._pool.shutdown()
