"""The worker: fetch → dispatch → complete, heartbeats, notifications, plugins, signals."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from chancy import store as store_module
from chancy.errors import (
    ClaimLostError,
    ConfigurationError,
    MigrationsNeededError,
    ResultTooLargeError,
)
from chancy.executors.base import Execution, Executor, Kind
from chancy.hub import Hub
from chancy.job import QueuedJob, Reference
from chancy.queue import Queue
from chancy.store import Claim, Op, Outcome

if TYPE_CHECKING:
    from types import TracebackType

    from chancy.app import Chancy
    from chancy.plugin import Plugin

T = TypeVar("T")
#: How long a fetch loop may wait for more slots to free before claiming (seconds).
FETCH_GATHER_WINDOW = 0.002


class Worker:
    """Serves the declared queues whose tags match this worker's tags.

    ``await worker.start()`` blocks until the worker stops (SIGTERM/SIGINT or
    :meth:`stop`); ``async with Worker(chancy) as worker:`` runs it in the background for
    the body of the block. A dead worker's jobs run again within about
    ``heartbeat_timeout`` + the Recovery plugin's interval. Progress that jobs report is
    written at most once per ``progress_interval`` seconds.
    """

    def __init__(
        self,
        chancy: Chancy,
        *,
        worker_id: str | None = None,
        heartbeat_poll_interval: float = 10,
        heartbeat_timeout: float = 30,
        queue_change_poll_interval: float = 10,
        shutdown_timeout: float = 30,
        tags: Iterable[str] | None = None,
        register_signal_handlers: bool = True,
        queues: Iterable[str] | None = None,
        concurrency: int | None = None,
        completion_interval: float = 0.005,
        pool_size: int = 8,
        progress_interval: float = 1.0,
    ) -> None:
        if heartbeat_timeout <= heartbeat_poll_interval:
            raise ConfigurationError("heartbeat_timeout must exceed heartbeat_poll_interval")
        for label, value in (
            ("heartbeat_poll_interval", heartbeat_poll_interval),
            ("queue_change_poll_interval", queue_change_poll_interval),
            ("shutdown_timeout", shutdown_timeout + 1),
            ("progress_interval", progress_interval),
        ):
            if not value > 0:
                raise ConfigurationError(f"{label} must be positive")
        self.chancy = chancy
        self.worker_id = worker_id or str(uuid.uuid4())
        self.heartbeat_poll_interval = heartbeat_poll_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.queue_change_poll_interval = queue_change_poll_interval
        self.shutdown_timeout = shutdown_timeout
        self.register_signal_handlers = register_signal_handlers
        self.hostname = socket.gethostname()
        self.tags: set[str] = {f"hostname={self.hostname}", f"worker_id={self.worker_id}"}
        self.tags.update(tags or ())
        self.only_queues = set(queues) if queues is not None else None
        self.concurrency_override = concurrency
        self.completion_interval = completion_interval
        self.pool_size = pool_size
        self.progress_interval = progress_interval
        self._pool: AsyncConnectionPool | None = None
        self.log = chancy.log
        self.hub = Hub()
        self.is_leader = asyncio.Event()
        self.stopping = asyncio.Event()
        self.executors: dict[str, Executor] = {}
        self.queues: dict[str, Queue] = {}
        self._retiring: set[Executor] = set()
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        # Set when a queue's settings change: ends a wait for a spent rate window.
        self._reconfigured: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._outcomes: list[Outcome] = []
        #: How many of ``_outcomes`` belong to each queue (the fetch loop reads it often).
        self._outcomes_by_queue: collections.Counter[str] = collections.Counter()
        self._outcomes_ready = asyncio.Event()
        self._refresh_queues = asyncio.Event()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._force = False
        self._signals = 0
        self._start_task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._pending_hooks: set[asyncio.Future[None]] = set()
        self._meta_snapshots: dict[Reference, str] = {}
        # Jobs fetched by this worker whose outcome is not yet written.
        self._claimed: set[tuple[Reference, int]] = set()
        self._unrecorded: collections.Counter[str] = collections.Counter()
        self._job_plugins: list[Plugin] = []
        self._completion_plugins: list[Plugin] = []
        self._update_plugins: list[Plugin] = []
        # Latest progress of running jobs (it goes with their outcome), and which of them
        # the progress loop has still to write.
        self._progress: dict[Reference, tuple[QueuedJob, dict[str, Any]]] = {}
        self._progress_unwritten: set[Reference] = set()
        self._progress_ready = asyncio.Event()
        # Outcomes committed in a job's own transaction, until the executor reports.
        self._committed: dict[Reference, Outcome] = {}

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Serve jobs until the worker is stopped; then shut down gracefully."""
        self.loop = asyncio.get_running_loop()
        await self.pool.open()
        try:
            await self._serve_until_stopped()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    async def _serve_until_stopped(self) -> None:
        if not await self.chancy.is_up_to_date():
            raise MigrationsNeededError("the database needs migrations: run chancy.migrate()")
        if not await self.run_op(self.chancy.store.autovacuum_enabled()):
            # Every claim and completion leaves a dead row version behind: without
            # vacuuming, the jobs table and its indexes grow and fetches slow down.
            self.log.warning(
                "worker %s: autovacuum is off for %sjobs; vacuum it regularly "
                "(docs: deployment) or turn autovacuum on",
                self.worker_id,
                self.chancy.prefix,
            )
        self._select_plugin_hooks()
        await self._heartbeat_once()
        installed = self._install_signal_handlers()
        try:
            self._spawn("heartbeat", self._heartbeat_loop, until_stopped=True)
            self._spawn("completions", self._completion_loop)
            self._spawn("progress", self._progress_loop)
            self._spawn("queues", self._queue_loop)
            if self.chancy.notifications:
                self._spawn("listen", self._listen_loop)
            for plugin in self.chancy.plugins.values():
                self._spawn(plugin.get_identifier(), self._plugin_runner(plugin))
            await self._refresh_queues_once()
            self._started.set()
            self.hub.emit("worker.started", self.worker_id)
            await self.stopping.wait()
            await self._shutdown()
        finally:
            for sig in installed:
                with contextlib.suppress(Exception):
                    self.loop.remove_signal_handler(sig)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._started.set()
            self._stopped.set()
            self.hub.emit("worker.stopped", self.worker_id)

    async def stop(self) -> None:
        """Ask the worker to stop gracefully and wait until it has."""
        self.stopping.set()
        if self._start_task is not None or self._started.is_set():
            await self._stopped.wait()

    async def wait_for_shutdown(self) -> None:
        """Wait until the worker has stopped."""
        await self._stopped.wait()

    async def __aenter__(self) -> Worker:
        self._start_task = asyncio.create_task(self.start(), name=f"chancy-worker-{self.worker_id}")
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({self._start_task, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._start_task.done():
            started.cancel()
            self._start_task.result()  # raise start-up errors here
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        if self._start_task is not None:
            await self._start_task

    def _install_signal_handlers(self) -> list[signal.Signals]:
        if not self.register_signal_handlers or threading.current_thread() is not (
            threading.main_thread()
        ):
            return []
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):
                pass
        return installed

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            self.log.info("worker %s: signal %s, stopping gracefully", self.worker_id, sig)
            self.stopping.set()
            return
        self.log.warning("worker %s: second signal, exiting now", self.worker_id)
        self._force = True
        # Record nothing more: the running jobs keep their claim and are recovered by
        # another worker once this one's heartbeat expires.
        for executor in self._all_executors():
            kill_all = getattr(executor, "kill_all", None)
            if kill_all is not None:
                kill_all()
        os._exit(1)

    def _spawn(
        self, name: str, factory: Callable[[], Awaitable[None]], *, until_stopped: bool = False
    ) -> None:
        task = self._supervise(name, factory, until_stopped=until_stopped)
        self._tasks.append(asyncio.create_task(task, name=name))

    async def _supervise(
        self, name: str, factory: Callable[[], Awaitable[None]], *, until_stopped: bool = False
    ) -> None:
        """Run a loop forever: errors are logged and the loop restarts with back-off.
        Loops end when the worker begins to stop, or with ``until_stopped`` only when
        they are cancelled after shutdown."""
        delay = 0.1
        while until_stopped or not self.stopping.is_set():
            started = time.monotonic()
            try:
                await factory()
                if self.stopping.is_set() and not until_stopped:
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("worker %s: %s failed; restarting", self.worker_id, name)
            if time.monotonic() - started > 30:
                delay = 0.1
            if until_stopped:
                await asyncio.sleep(delay)
            else:
                await self._sleep(delay)
            delay = min(delay * 2, 5.0)

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending_hooks.add(task)
        task.add_done_callback(self._pending_hooks.discard)

    def _plugin_runner(self, plugin: Plugin) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await plugin.run(self, self.chancy)
            await self.stopping.wait()

        return run

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep, returning early (True) when stopping or when ``wake`` is set."""
        waiters = [asyncio.ensure_future(self.stopping.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
            return bool(done)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def run_op(self, op: Op[T]) -> T:
        """Run a store operation on a connection of the worker's own pool."""
        async with self.pool.connection() as conn:
            return await store_module.arun(conn, op)

    @property
    def pool(self) -> AsyncConnectionPool:
        """The worker's own connections: its loops never wait behind the application's
        pushes, and they skip the pool's pre-use check (a failed statement is retried by
        the loop that ran it)."""
        if self._pool is None:
            self._pool = AsyncConnectionPool(
                self.chancy.dsn,
                min_size=1,
                max_size=self.pool_size,
                kwargs=self.chancy._connection_kwargs(),
                reconnect_timeout=self.chancy.poll_reconnect_timeout,
                configure=self.chancy._configure_async,
                open=False,
                name=f"chancy-worker-{self.worker_id}",
            )
        return self._pool

    # -- heartbeat --------------------------------------------------------------------

    async def _heartbeat_once(self) -> None:
        await self.run_op(
            self.chancy.store.heartbeat(
                self.worker_id,
                hostname=self.hostname,
                pid=os.getpid(),
                tags=self.tags,
                queues=self.queues,
                timeout=self.heartbeat_timeout,
            )
        )

    async def _heartbeat_loop(self) -> None:
        # Runs until the worker has fully stopped, shutdown included: jobs finishing
        # within shutdown_timeout must not look orphaned to other workers.
        while True:
            await asyncio.sleep(self.heartbeat_poll_interval)
            await self._heartbeat_once()
            await self._poll_cancellations()
            await self._reconcile_claims()

    async def _poll_cancellations(self) -> None:
        running = {ref: ex for ex in self._all_executors() for ref in ex.running}
        if not running:
            return
        cancelled = await self.run_op(self.chancy.store.cancelled_among(running))
        for ref in cancelled:
            await running[ref].interrupt(ref, Kind.CANCELLED)

    async def _reconcile_claims(self) -> None:
        """Hand back jobs the database says we run but we do not know of: their claim
        committed but the fetch's answer was lost (a dropped connection). Without this
        they would stay ``running`` for as long as this worker heartbeats."""
        age = max(2 * self.heartbeat_poll_interval, 1.0)
        claimed = await self.run_op(self.chancy.store.running_of_worker(self.worker_id, age))
        lost = {
            ref: attempts
            for ref, attempts in claimed.items()
            if (ref, attempts) not in self._claimed
        }
        if not lost:
            return
        found = await self.run_op(self.chancy.store.get_jobs(lost))
        outcomes = [
            Outcome(
                job,
                "retrying",
                refund=True,
                error="chancy.errors.ChancyError: claim lost before the job started; handed back",
            )
            for job in found
            if job.attempts == lost[job.id] and (job.id, job.attempts) not in self._claimed
        ]
        if outcomes:
            self.log.warning(
                "worker %s: handing back %d lost claim(s)", self.worker_id, len(outcomes)
            )
            await self.run_op(self.chancy.store.complete_jobs(self.worker_id, outcomes))

    def _all_executors(self) -> list[Executor]:
        return [*self.executors.values(), *self._retiring]

    # -- notifications ----------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """LISTEN for pushes, cancellations and queue changes. Only a latency hint: every
        loop also polls, so losing this connection loses nothing."""
        conn = await psycopg.AsyncConnection.connect(self.chancy.dsn, autocommit=True)
        try:
            await conn.execute(
                sql.SQL("LISTEN {}").format(sql.Identifier(self.chancy.store.channel))
            )
            # Anything pushed while we were not listening is picked up now.
            for wake in self._wake.values():
                wake.set()
            while not self.stopping.is_set():
                # Returns every half second so that the loop notices a stop.
                async for notify in conn.notifies(timeout=0.5):
                    self._on_notify(notify.payload)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_notify(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        kind = event.get("e")
        if kind == "pushed":
            wake = self._wake.get(event.get("q"))
            if wake is not None:
                wake.set()
        elif kind == "cancel":
            try:
                ref = Reference(event.get("j"))
            except Exception:
                return
            for executor in self._all_executors():
                if ref in executor.running:
                    self._background(executor.interrupt(ref, Kind.CANCELLED))
        elif kind == "queue":
            self._refresh_queues.set()
        self.hub.emit(f"notify.{kind}", event)

    # -- queues -----------------------------------------------------------------------

    async def _queue_loop(self) -> None:
        while not self.stopping.is_set():
            await self._sleep(self.queue_change_poll_interval, self._refresh_queues)
            if self.stopping.is_set():
                return
            await self._refresh_queues_once()

    async def _refresh_queues_once(self) -> None:
        self._refresh_queues.clear()
        await self.run_op(self.chancy.store.resume_due_queues())
        declared = {q.name: q for q in await self.run_op(self.chancy.store.get_queues())}
        wanted = {
            name: queue
            for name, queue in declared.items()
            if queue.matches(self.tags) and (self.only_queues is None or name in self.only_queues)
        }
        for name in list(self.queues):
            if name not in wanted:
                await self._stop_queue(name)
        for name, queue in wanted.items():
            current = self.queues.get(name)
            if current is None:
                self._start_queue(queue)
            elif _executor_settings(current) != _executor_settings(queue):
                await self._stop_queue(name)
                self._start_queue(queue)
            else:
                self.queues[name] = queue
                if queue.state != current.state:
                    self._wake[name].set()
                if queue != current:
                    self._reconfigured[name].set()

    def _start_queue(self, queue: Queue) -> None:
        try:
            executor = self._make_executor(queue)
        except Exception:
            self.log.exception("worker %s: cannot serve queue %s", self.worker_id, queue.name)
            return
        self.queues[queue.name] = queue
        self.executors[queue.name] = executor
        self._wake[queue.name] = asyncio.Event()
        self._reconfigured[queue.name] = asyncio.Event()
        self._runners[queue.name] = asyncio.create_task(
            self._supervise(f"queue {queue.name}", lambda: self._serve(queue.name)),
            name=f"chancy-queue-{queue.name}",
        )
        self.hub.emit("queue.started", queue.name)

    async def _stop_queue(self, name: str) -> None:
        runner = self._runners.pop(name, None)
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
        self.queues.pop(name, None)
        self._wake.pop(name, None)
        self._reconfigured.pop(name, None)
        executor = self.executors.pop(name, None)
        if executor is not None:
            # Running jobs finish in the background; the executor is then released.
            self._retiring.add(executor)
            self._background(self._retire(executor))
        self.hub.emit("queue.stopped", name)

    async def _retire(self, executor: Executor) -> None:
        await executor.idle.wait()
        await executor.stop()
        self._retiring.discard(executor)

    def _make_executor(self, queue: Queue) -> Executor:
        module_name, _, class_name = queue.executor.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise ConfigurationError(f"{queue.executor} is not an Executor")
        executor: Executor = cls(
            self, queue, self.concurrency_override, **dict(queue.executor_options)
        )
        return executor

    async def _serve(self, name: str) -> None:
        """The fetch loop of one queue: fetch as many jobs as there are free slots; when
        the queue is drained, wait for a notification or the polling interval (with
        ``eager_polling``, also for this worker to record finished jobs); when its rate
        limit's window is spent, wait until the next window opens."""
        executor = self.executors[name]
        wake = self._wake[name]
        reconfigured = self._reconfigured[name]
        gathered = False
        while not self.stopping.is_set():
            queue = self.queues[name]
            if queue.state != Queue.State.ACTIVE:
                await self._sleep(queue.polling_interval, wake)
                wake.clear()
                continue
            # Finished jobs whose outcome is not written yet hold their slot, so that a
            # slow database cannot make this worker claim more than it can run. Pending
            # outcomes are written in the same round trip as the fetch.
            writable = self._outcomes_by_queue[name]
            unrecorded = self._unrecorded[name] - writable
            free = min(executor.free_slots, executor.capacity - unrecorded)
            if free <= 0:
                executor.slot_freed.clear()
                await self._sleep(queue.polling_interval, executor.slot_freed)
                continue
            # A few slots free while others still run: gather more (briefly) so that one
            # round trip refills many slots. Once per fetch, so a long job cannot stall it.
            if not gathered and free < executor.capacity // 2 and executor.running:
                gathered = True
                await executor.gather_free_slots(executor.capacity // 2, FETCH_GATHER_WINDOW)
                continue
            gathered = False
            wake.clear()
            reconfigured.clear()
            claim = await self._record_and_fetch(name, free)
            jobs = claim.jobs
            for job in jobs:
                self._claimed.add((job.id, job.attempts))
                self._unrecorded[name] += 1
            await self._dispatch_all(executor, jobs)
            if self.stopping.is_set():
                break
            if claim.rate_limited_for is not None:
                # Fetching again before the window reopens would claim nothing.
                await self._sleep(claim.rate_limited_for, reconfigured)
            elif len(jobs) < free:
                await self._sleep(queue.polling_interval, wake)

    async def _record_and_fetch(self, name: str, limit: int) -> Claim:
        """Write every pending outcome and claim up to ``limit`` jobs: one round trip."""
        batch = self._take_outcomes()
        store = self.chancy.store
        try:
            async with self.pool.connection() as conn:
                if batch:
                    _, jobs = await store_module.arun_pipelined(
                        conn,
                        [
                            store.complete_jobs(self.worker_id, batch, held=False),
                            store.claim_jobs(name, self.worker_id, limit),
                        ],
                    )
                else:  # nothing to write: a plain statement saves the pipeline's extra sync
                    jobs = await store_module.arun(
                        conn, store.claim_jobs(name, self.worker_id, limit)
                    )
        except BaseException:
            self._return_outcomes(batch)
            raise
        # The fetch ran after the batch was written: no need to wake this queue for it.
        self._recorded(batch, fetched=name)
        return jobs  # type: ignore[no-any-return]

    async def _dispatch_all(self, executor: Executor, jobs: list[QueuedJob]) -> None:
        """Start claimed jobs; any not started (the runner was cancelled) go back."""
        waiting = list(jobs)
        try:
            while waiting:
                await self._dispatch(executor, waiting.pop(0))
        finally:
            for job in waiting:
                self._queue_outcome(Outcome(job, "pending", refund=True))

    async def _dispatch(self, executor: Executor, job: QueuedJob) -> None:
        if self._force:
            return
        if job.meta:
            self._meta_snapshots[job.id] = _meta_key(job.meta)
        claimed = job
        try:
            for plugin in self._job_plugins:
                job = await plugin.on_job_starting(self, job)
        except asyncio.CancelledError:
            self._meta_snapshots.pop(claimed.id, None)
            self._queue_outcome(Outcome(claimed, "pending", refund=True))
            raise
        except Exception:
            self.log.exception("worker %s: on_job_starting failed for %s", self.worker_id, job.id)
            error = "chancy.errors.ChancyError: a plugin failed before the job started\n"
            self._queue_outcome(self._outcome_for(Execution(claimed, Kind.ERROR, error=error)))
            return
        # Announced before the push: a job that ends within it (fails to start) is
        # then always announced as started before it is announced as completed.
        self.hub.emit("job.started", job)
        await executor.push(job)

    # -- outcomes ---------------------------------------------------------------------

    def _select_plugin_hooks(self) -> None:
        from chancy.plugin import Plugin

        plugins = list(self.chancy.plugins.values())
        self._job_plugins = [
            p for p in plugins if type(p).on_job_starting is not Plugin.on_job_starting
        ]
        self._completion_plugins = [
            p for p in plugins if type(p).on_job_completed is not Plugin.on_job_completed
        ]
        self._update_plugins = [
            p for p in plugins if type(p).on_job_updated is not Plugin.on_job_updated
        ]

    def on_execution(self, executor: Executor, execution: Execution) -> None:
        """Called by executors when a job ends; queues its outcome for the next batch."""
        if self._force:
            return  # forced exit: the claims stay for Recovery
        committed = self._committed.pop(execution.job.id, None)
        if execution.recorded and committed is not None:
            # Committed with the job's own transaction: nothing left to write.
            self.hub.emit("job.completed", committed)
            self._recorded([committed])
            return
        outcome = self._outcome_for(execution)
        if self._completion_plugins:
            task = asyncio.ensure_future(self._apply_plugins(outcome))
            self._pending_hooks.add(task)
            task.add_done_callback(self._pending_hooks.discard)
        else:
            self._queue_outcome(outcome)

    async def _apply_plugins(self, outcome: Outcome) -> None:
        self._queue_outcome(await self._run_completion_plugins(outcome))

    async def _run_completion_plugins(self, outcome: Outcome) -> Outcome:
        for plugin in self._completion_plugins:
            try:
                outcome = await plugin.on_job_completed(self, outcome)
            except Exception:
                self.log.exception("plugin %s failed on job completion", plugin.get_identifier())
        return outcome

    def _encode_result(self, outcome: Outcome) -> Outcome:
        """Encode a success's result once; one larger than ``max_result_size`` turns the
        outcome into a failure (not retried: the same result would come back)."""
        if outcome.state != "succeeded" or outcome.result is None:
            return outcome
        encoded = self.chancy.store.dumps_lenient(outcome.result)
        size = len(encoded.encode())
        limit = self.chancy.max_result_size
        if limit is not None and size > limit:
            outcome.state = "failed"
            outcome.result = None
            outcome.error = (
                f"chancy.errors.ResultTooLargeError: {outcome.job.func} returned {size} bytes "
                f"of JSON; the limit is {limit} (Chancy(max_result_size=...))"
            )
            outcome.exception = ["chancy.errors.ResultTooLargeError"]
            return outcome
        outcome.encoded_result = encoded
        return outcome

    async def prepare_committed_outcome(
        self, job: QueuedJob, result: Any, meta: dict[str, Any]
    ) -> Outcome:
        """The success outcome of a job that commits it in its own transaction (after
        the completion plugins); raises if the result cannot be stored, so that the
        transaction rolls back and the job fails through the usual path."""
        execution = Execution(job, Kind.SUCCEEDED, result=result, meta=meta)
        outcome = self._encode_result(
            await self._run_completion_plugins(self._outcome_for(execution))
        )
        if outcome.state == "failed":
            raise ResultTooLargeError(outcome.error or "result too large")
        self._committed[job.id] = outcome
        return outcome

    async def complete_in_transaction(
        self, conn: psycopg.AsyncConnection[Any], job: QueuedJob, result: Any
    ) -> None:
        """Write a job's success on ``conn``, inside the job's open transaction; raises
        :class:`~chancy.errors.ClaimLostError` (rolling the job's work back with it)
        unless the claim still holds."""
        outcome = await self.prepare_committed_outcome(job, result, dict(job.meta))
        held = await store_module.arun(
            conn, self.chancy.store.complete_jobs(self.worker_id, [outcome])
        )
        if job.id not in held:
            self._committed.pop(job.id, None)
            raise ClaimLostError(f"{job.func}: the claim on job {job.id} was lost")

    def _queue_outcome(self, outcome: Outcome) -> None:
        self._encode_result(outcome)
        self._outcomes.append(outcome)
        self._outcomes_by_queue[outcome.job.queue] += 1
        self._outcomes_ready.set()
        self.hub.emit("job.completed", outcome)

    def _outcome_for(self, execution: Execution) -> Outcome:
        job = execution.job
        original = self._meta_snapshots.pop(job.id, None)
        meta = execution.meta or None
        if original is not None and meta is not None and _meta_key(meta) == original:
            meta = None  # unchanged: nothing to write
        elif original is not None and meta is None:
            meta = {}
        kind = execution.kind
        progress = self._progress.pop(job.id, (job, None))[1]
        self._progress_unwritten.discard(job.id)
        if kind is Kind.SUCCEEDED:
            outcome = Outcome(job, "succeeded", meta=meta, result=execution.result)
        elif kind is Kind.SNOOZED:
            outcome = Outcome(job, "pending", delay=execution.delay, refund=True, meta=meta)
        elif kind is Kind.INTERRUPTED:
            # Handed back by shutdown: the attempt was not the job's fault.
            outcome = Outcome(job, "pending", refund=True, meta=meta)
        elif kind is Kind.CANCELLED:
            outcome = Outcome(job, "cancelled", error=execution.error, meta=meta)
        else:
            # An oversize result (raised in a job's own transaction) would come back.
            hopeless = "chancy.errors.ResultTooLargeError" in (execution.exception or ())
            state = "retrying" if job.attempts < job.max_attempts and not hopeless else "failed"
            outcome = Outcome(job, state, error=execution.error, meta=meta)
        outcome.exception = execution.exception
        outcome.progress = progress
        return outcome

    async def _completion_loop(self) -> None:
        while True:
            await self._outcomes_ready.wait()
            if self.completion_interval and not self.stopping.is_set():
                await asyncio.sleep(self.completion_interval)
            await self.flush_outcomes()

    def _take_outcomes(self) -> list[Outcome]:
        self._outcomes_ready.clear()
        batch, self._outcomes = self._outcomes, []
        self._outcomes_by_queue.clear()
        return batch

    def _return_outcomes(self, batch: list[Outcome]) -> None:
        # Kept for the next write; the claim guard makes writing one twice harmless.
        self._outcomes[:0] = batch
        self._outcomes_by_queue.update(outcome.job.queue for outcome in batch)
        if self._outcomes:
            self._outcomes_ready.set()

    async def flush_outcomes(self) -> None:
        """Write every queued outcome in one statement (kept for retry on failure)."""
        batch = self._take_outcomes()
        if not batch:
            return
        try:
            await self.run_op(self.chancy.store.complete_jobs(self.worker_id, batch, held=False))
        except BaseException:
            self._return_outcomes(batch)
            raise
        self._recorded(batch)

    def _recorded(self, batch: list[Outcome], fetched: str | None = None) -> None:
        if not batch:
            return
        recorded = collections.Counter(outcome.job.queue for outcome in batch)
        for outcome in batch:
            self._claimed.discard((outcome.job.id, outcome.job.attempts))
            # A thread that committed after its job was already reported (timed out), or
            # a progress report that arrived after the outcome was taken.
            self._committed.pop(outcome.job.id, None)
            self._progress.pop(outcome.job.id, None)
        for queue_name, count in recorded.items():
            self._unrecorded[queue_name] = max(self._unrecorded[queue_name] - count, 0)
            executor = self.executors.get(queue_name)
            if executor is not None:
                executor.slot_freed.set()
            if queue_name != fetched:
                self._wake_after_recorded(queue_name, batch)
        self.hub.emit("job.recorded", batch)
        # A job handed back to run again soon is fetched when due, not a poll later.
        for outcome in batch:
            if outcome.state in ("pending", "retrying"):
                queue = self.queues.get(outcome.job.queue)
                wake = self._wake.get(outcome.job.queue)
                if (
                    queue is not None
                    and wake is not None
                    and outcome.delay < queue.polling_interval
                ):
                    self.loop.call_later(outcome.delay, wake.set)

    def _wake_after_recorded(self, queue_name: str, batch: list[Outcome]) -> None:
        """Fetch again now if the queue polls eagerly, or if a finished job freed a place
        under its concurrency key (jobs of that key may be waiting)."""
        queue = self.queues.get(queue_name)
        wake = self._wake.get(queue_name)
        if queue is None or wake is None:
            return
        if queue.eager_polling or any(
            outcome.job.queue == queue_name and outcome.job.concurrency_key is not None
            for outcome in batch
        ):
            wake.set()

    # -- progress ---------------------------------------------------------------------

    def set_progress(self, job: QueuedJob, percent: float, message: str | None) -> None:
        """Remember a running job's latest progress (called on the loop thread by the
        executors' sinks); the progress loop writes it within ``progress_interval``."""
        if (job.id, job.attempts) not in self._claimed:
            return  # already recorded: a late report
        self._progress[job.id] = (job, {"percent": percent, "message": message})
        self._progress_unwritten.add(job.id)
        self._progress_ready.set()

    async def _progress_loop(self) -> None:
        """Write the latest progress of every job that reported since the last write, in
        one claim-guarded statement, at most once per ``progress_interval``."""
        while True:
            await self._progress_ready.wait()
            self._progress_ready.clear()
            due, self._progress_unwritten = self._progress_unwritten, set()
            updates = [self._progress[ref] for ref in due if ref in self._progress]
            try:
                written = await self.run_op(
                    self.chancy.store.update_progress(self.worker_id, updates)
                )
            except BaseException:
                self._progress_unwritten.update(job.id for job, _ in updates)
                self._progress_ready.set()
                raise
            for job, progress in updates:
                if job.id in written:
                    self.hub.emit("job.updated", (job, {"progress": progress}))
                    for plugin in self._update_plugins:
                        self._background(
                            self._call_update_plugin(plugin, job, {"progress": progress})
                        )
            await self._sleep(self.progress_interval)

    async def _call_update_plugin(
        self, plugin: Plugin, job: QueuedJob, changes: dict[str, Any]
    ) -> None:
        try:
            await plugin.on_job_updated(self, job, changes)
        except Exception:
            self.log.exception("plugin %s failed on job update", plugin.get_identifier())

    # -- shutdown ---------------------------------------------------------------------

    async def _shutdown(self) -> None:
        # Fetch loops notice `stopping` and end on their own; a fetch in flight completes
        # so that its claimed jobs are dispatched (and handed back) rather than orphaned.
        runners = list(self._runners.values())
        if runners:
            _, stuck = await asyncio.wait(runners, timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
        executors = self._all_executors()
        for executor in executors:
            executor.release_buffered()  # prefetched, not started: back to the queue
        idle = [asyncio.ensure_future(e.idle.wait()) for e in executors]
        if idle:
            _, late = await asyncio.wait(idle, timeout=self.shutdown_timeout)
            for waiter in late:
                waiter.cancel()
        for executor in executors:
            await executor.interrupt_all(Kind.INTERRUPTED)
        # Interrupted jobs report through their executors (processes within kill_grace).
        waiters = [asyncio.ensure_future(e.idle.wait()) for e in executors if e.running]
        if waiters:
            await asyncio.wait(waiters, timeout=10)
        for executor in executors:
            for ref, job in list(executor.running.items()):
                executor.report(job, Kind.INTERRUPTED, error="worker shut down")
                del ref
        # A batch the completion loop is still writing must not be lost: stop the loop
        # (a cancelled write puts its batch back) and write everything here.
        completions = [task for task in self._tasks if task.get_name() == "completions"]
        for task in completions:
            task.cancel()
        await asyncio.gather(*completions, return_exceptions=True)
        await self._flush_with_retry()
        # Heartbeats ran until now so that no one recovered jobs still finishing here.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for plugin in self.chancy.plugins.values():
            try:
                await plugin.cleanup(self)
            except Exception:
                self.log.exception("plugin %s cleanup failed", plugin.get_identifier())
        for executor in executors:
            with contextlib.suppress(Exception):
                await executor.stop()
        with contextlib.suppress(Exception):
            await self.run_op(self.chancy.store.remove_worker(self.worker_id))

    async def _flush_with_retry(self, attempts: int = 5) -> None:
        if self._pending_hooks:
            await asyncio.wait(list(self._pending_hooks), timeout=5)
        for attempt in range(attempts):
            try:
                await self.flush_outcomes()
                return
            except Exception:
                self.log.exception("worker %s: could not record outcomes", self.worker_id)
                await asyncio.sleep(0.2 * (attempt + 1))


def _executor_settings(queue: Queue) -> tuple[Any, ...]:
    return (queue.executor, queue.concurrency, sorted(queue.executor_options.items()))


def _meta_key(meta: Any) -> str:
    return json.dumps(meta, sort_keys=True, default=repr)


def exit_if_threads_linger(margin: float = 2.0, code: int = 0) -> None:
    """For a process that only ran a worker (the CLI): once the worker has stopped, give
    threads that jobs left behind ``margin`` seconds, then end the process without them.
    Interpreter shutdown joins every non-daemon thread, so a job that started one and
    ignores cancellation would otherwise keep a stopped worker alive indefinitely."""
    deadline = time.monotonic() + margin
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0))
    lingering = [
        t.name for t in threading.enumerate() if t is not current and not t.daemon and t.is_alive()
    ]
    if lingering:
        logging.getLogger("chancy").warning(
            "threads left by jobs still running %.1f s after the worker stopped (%s): exiting",
            margin,
            ", ".join(lingering),
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
