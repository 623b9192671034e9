"""Run coroutine jobs as tasks in the worker's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import traceback
from collections.abc import Callable
from typing import Any

from chancy.executors.base import (
    Executor,
    Kind,
    classify_exception,
    connection_parameter,
    current_job,
    exception_types,
    import_function,
    injected_parameters,
    interrupt_message,
    is_async,
    prepare_call,
    time_limit,
)
from chancy.executors.thread import ElasticThreadPool
from chancy.job import QueuedJob, Reference
from chancy.progress import install_sink, reset_sink


class AsyncExecutor(Executor):
    """Each job is an asyncio task; time limits and cancellation cancel the task.

    Plain (non-async) functions are run in a thread so they cannot stall the loop.
    """

    default_concurrency = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tasks: dict[Reference, asyncio.Task[None]] = {}
        self._why: dict[Reference, Kind] = {}
        # Plain functions run on our own daemon threads: the default executor would make
        # asyncio.run() wait for a stuck job at exit.
        self._threads = ElasticThreadPool(f"chancy-async-{self.queue.name}")

    async def start_job(self, job: QueuedJob) -> None:
        self.start_job_nowait(job)

    def start_job_nowait(self, job: QueuedJob) -> bool:
        self._tasks[job.id] = asyncio.create_task(self._run(job))
        return True

    async def _run(self, job: QueuedJob) -> None:
        limit: asyncio.Timeout | None = None
        token = install_sink(self.progress_sink(job))
        seconds = time_limit(job) if job.limits else None
        try:
            if seconds is None:
                result, recorded = await self._call(job)
            else:
                async with asyncio.timeout(seconds) as limit:
                    result, recorded = await self._call(job)
        except asyncio.CancelledError:
            kind = self._why.pop(job.id, Kind.INTERRUPTED)
            self.report(job, kind, error=interrupt_message(kind, job), meta=dict(job.meta))
        except Exception as exc:
            if limit is not None and limit.expired():
                kind, delay, raised = Kind.TIMEOUT, 0.0, None
            else:
                (kind, delay), raised = classify_exception(exc), exception_types(exc)
            self.report(
                job,
                kind,
                error=traceback.format_exc(),
                delay=delay,
                meta=dict(job.meta),
                exception=raised,
            )
        else:
            self.report(job, Kind.SUCCEEDED, result=result, meta=dict(job.meta), recorded=recorded)
        finally:
            reset_sink(token)
            self._tasks.pop(job.id, None)

    async def _call(self, job: QueuedJob) -> tuple[Any, bool]:
        """Run the job; returns its result and whether its outcome is already committed."""
        func = import_function(job.func)
        if is_async(func) and not injected_parameters(func):
            # The common case, without prepare_call's copy of the kwargs.
            current_job.set(job)
            result = await func(**job.kwargs)
            if result is not None and inspect.isawaitable(result):
                result = await result
            return result, False
        wanted = connection_parameter(func)
        if wanted is not None and wanted[1] == "async_connection" and is_async(func):
            return await self._call_in_transaction(job, wanted[0]), True
        func, kwargs = prepare_call(job)
        if is_async(func):
            result = await func(**kwargs)
        else:
            result = await self._call_in_thread(func, kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result, False

    async def _call_in_transaction(self, job: QueuedJob, parameter: str) -> Any:
        """Give the job a connection inside a transaction and commit its completion in
        that same transaction (claim-guarded): its database work happens exactly once,
        and rolls back if it raises or its claim was lost."""
        async with self.worker.chancy.pool.connection() as conn, conn.transaction():
            func, kwargs = prepare_call(job, (parameter, conn))
            result = await func(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            await self.worker.complete_in_transaction(conn, job, result)
        return result

    async def _call_in_thread(self, func: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()

        def settle(error: BaseException | None, result: Any) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            error: BaseException | None = None
            result: Any = None
            try:
                result = context.run(func, **kwargs)
            except BaseException as exc:  # handed to the awaiting task
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, error, result)

        self._threads.submit(run)
        return await future

    async def stop(self) -> None:
        self._threads.shutdown()

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        task = self._tasks.get(ref)
        if task is None:
            return await super().interrupt(ref, kind)
        self._why[ref] = kind
        task.cancel()
        return None
