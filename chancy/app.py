"""The :class:`Chancy` application: connection pools and the public API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import functools
import itertools
import json
import logging
import select
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from chancy import store as store_module
from chancy.errors import (
    ConfigurationError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    JobValidationError,
    MigrationPermissionError,
    NotConnectedError,
    QueueValidationError,
    UnknownQueueError,
)
from chancy.job import FINISHED_STATES, Job, QueuedJob, Reference, validate_queue_name
from chancy.queue import Queue
from chancy.signature import check_job_arguments, has_signature
from chancy.store import JsonDumps, JsonLoads, Op, PushResult, Store, default_json

if TYPE_CHECKING:
    from chancy.plugin import Plugin

T = TypeVar("T")
RefLike = Reference | str | uuid.UUID
CORE_MIGRATIONS = "chancy.migrations.core"
#: Default cap on a stored result: 1 MiB of JSON.
DEFAULT_MAX_RESULT_SIZE = 1_048_576


def _dsn_from(dsn: str | Mapping[str, Any]) -> str:
    """Accept a libpq string/URL or a Django-style ``DATABASES`` entry."""
    if isinstance(dsn, str):
        return dsn
    if isinstance(dsn, Mapping):
        params: dict[str, Any] = {}
        for key, name in (
            ("NAME", "dbname"),
            ("USER", "user"),
            ("PASSWORD", "password"),
            ("HOST", "host"),
            ("PORT", "port"),
        ):
            if dsn.get(key):
                params[name] = dsn[key]
        # Django-only OPTIONS (pool, server_side_binding, ...) are not libpq parameters.
        libpq = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
        params.update((k, v) for k, v in (dsn.get("OPTIONS") or {}).items() if k in libpq)
        return make_conninfo("", **params)
    raise ConfigurationError(f"dsn must be a string or a DATABASES-style dict, not {dsn!r}")


class Chancy:
    """The entry point: holds the connection pools and pushes, reads and controls jobs.

    ``require_declared_queues`` (default True) makes a push to a queue that was never
    declared raise :class:`~chancy.errors.UnknownQueueError`; set it False to allow pushing
    ahead of the declaration.

    ``json_dumps``/``json_loads`` replace the JSON codec for job data (orjson by default
    when installed); ``max_result_size`` caps a stored result's JSON in bytes (a larger
    one fails its job); ``validate_kwarg_types`` checks kwargs against ``@job``
    annotations at push (needs pydantic). See docs/results.md.
    """

    class Executor(enum.StrEnum):
        """Import paths of the built-in executors, usable as ``Queue(executor=...)``."""

        Process = "chancy.executors.process.ProcessExecutor"
        Threaded = "chancy.executors.thread.ThreadedExecutor"
        Async = "chancy.executors.asyncex.AsyncExecutor"
        SubInterpreter = "chancy.executors.sub.SubInterpreterExecutor"

    def __init__(
        self,
        dsn: str | Mapping[str, Any],
        *,
        plugins: Iterable[Plugin] | None = None,
        prefix: str = "chancy_",
        min_connection_pool_size: int = 1,
        max_connection_pool_size: int = 10,
        poll_reconnect_timeout: float = 300,
        notifications: bool = True,
        log: logging.Logger | None = None,
        no_default_plugins: bool = False,
        require_declared_queues: bool = True,
        prepare_threshold: int | None = 5,
        json_dumps: JsonDumps | None = None,
        json_loads: JsonLoads | None = None,
        max_result_size: int | None = DEFAULT_MAX_RESULT_SIZE,
        validate_kwarg_types: bool = False,
    ) -> None:
        self.dsn = _dsn_from(dsn)
        default_dumps, default_loads = default_json()
        self.json_dumps: JsonDumps = json_dumps or default_dumps
        self.json_loads: JsonLoads = json_loads or default_loads
        if max_result_size is not None and (
            isinstance(max_result_size, bool)
            or not isinstance(max_result_size, int)
            or max_result_size < 1
        ):
            raise ConfigurationError("max_result_size must be a positive int (bytes) or None")
        self.max_result_size = max_result_size
        self._round_trip: Callable[[Mapping[str, Any]], Any] | None = None
        if validate_kwarg_types:
            try:
                import pydantic  # noqa: F401
            except ImportError:
                raise ConfigurationError(
                    "validate_kwarg_types needs pydantic: pip install 'chancy[pydantic]'"
                ) from None
            self._round_trip = lambda kwargs: self.json_loads(self.json_dumps(kwargs))
        self.store = Store(prefix, json_dumps=self.json_dumps, notify_completions=notifications)
        self.prefix = prefix
        if not 0 <= min_connection_pool_size <= max_connection_pool_size:
            raise ConfigurationError("need 0 <= min_connection_pool_size <= max")
        if max_connection_pool_size < 1:
            raise ConfigurationError("max_connection_pool_size must be >= 1")
        self.min_connection_pool_size = min_connection_pool_size
        self.max_connection_pool_size = max_connection_pool_size
        self.poll_reconnect_timeout = poll_reconnect_timeout
        self.notifications = notifications
        self.log = log or logging.getLogger("chancy")
        self.require_declared_queues = require_declared_queues
        self.prepare_threshold = prepare_threshold
        self.plugins: dict[str, Plugin] = {}
        if not no_default_plugins:
            from chancy.plugins import default_plugins

            for plugin in default_plugins():
                self.plugins[plugin.get_identifier()] = plugin
        for plugin in plugins or ():
            self.plugins[plugin.get_identifier()] = plugin
        self._pool: AsyncConnectionPool | None = None
        self._sync_pool: ConnectionPool | None = None
        self._listener: _CompletionListener | None = None

    # -- pools ------------------------------------------------------------------------

    async def _check_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Pool check before lending a connection. A server that closed the connection
        (restart, pg_terminate_backend) leaves data or EOF on an idle socket, so only
        then is a round trip spent. A dead connection means its idle siblings are dead
        too: check them all now rather than fail one caller for each."""
        if not _socket_has_data(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.OperationalError:
            if self._pool is not None:
                await self._pool.check()
            raise

    def _check_sync(self, conn: psycopg.Connection[Any]) -> None:
        """Sync twin of :meth:`_check_async`."""
        if not _socket_has_data(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.OperationalError:
            if self._sync_pool is not None:
                self._sync_pool.check()
            raise

    def _connection_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "prepare_threshold": self.prepare_threshold}

    async def _configure_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Pool hook: decode json/jsonb with this app's ``json_loads``."""
        set_json_loads(self.json_loads, conn)

    def _configure_sync(self, conn: psycopg.Connection[Any]) -> None:
        """Sync twin of :meth:`_configure_async`."""
        set_json_loads(self.json_loads, conn)

    @property
    def pool(self) -> AsyncConnectionPool:
        """The async pool; opened by ``async with chancy``."""
        if self._pool is None:
            raise NotConnectedError("use `async with chancy:` before calling async methods")
        return self._pool

    @property
    def sync_pool(self) -> ConnectionPool:
        """The sync pool; opened by ``with chancy``."""
        if self._sync_pool is None:
            raise NotConnectedError("use `with chancy:` before calling sync_* methods")
        return self._sync_pool

    async def __aenter__(self) -> Chancy:
        if self._pool is None:
            pool = AsyncConnectionPool(
                self.dsn,
                min_size=self.min_connection_pool_size,
                max_size=self.max_connection_pool_size,
                kwargs=self._connection_kwargs(),
                reconnect_timeout=self.poll_reconnect_timeout,
                check=self._check_async,
                configure=self._configure_async,
                open=False,
                name=f"{self.prefix}pool",
            )
            await pool.open()
            self._pool = pool
        return self

    async def __aexit__(self, *exc: object) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def __enter__(self) -> Chancy:
        if self._sync_pool is None:
            pool = ConnectionPool(
                self.dsn,
                min_size=self.min_connection_pool_size,
                max_size=self.max_connection_pool_size,
                kwargs=self._connection_kwargs(),
                reconnect_timeout=self.poll_reconnect_timeout,
                check=self._check_sync,
                configure=self._configure_sync,
                open=False,
                name=f"{self.prefix}sync-pool",
            )
            pool.open()
            self._sync_pool = pool
        return self

    def __exit__(self, *exc: object) -> None:
        pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.close()

    async def _run(self, op: Op[T], *, transaction: bool = False) -> T:
        async with self.pool.connection() as conn:
            if transaction:
                async with conn.transaction():
                    return await store_module.arun(conn, op)
            return await store_module.arun(conn, op)

    def _sync_run(self, op: Op[T], *, transaction: bool = False) -> T:
        with self.sync_pool.connection() as conn:
            if transaction:
                with conn.transaction():
                    return store_module.run(conn, op)
            return store_module.run(conn, op)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow an (autocommit) connection from the async pool."""
        async with self.pool.connection() as conn:
            yield conn

    # -- migrations -------------------------------------------------------------------

    def _migration_sets(self) -> list[tuple[str, str]]:
        sets = [("core", CORE_MIGRATIONS)]
        for plugin in self.plugins.values():
            package = plugin.migrations_package()
            if package:
                sets.append((plugin.get_identifier(), package))
        return sets

    async def migrate(self, *, to_version: int | None = None) -> None:
        """Apply pending migrations (core, then each plugin's), or move core to
        ``to_version``. Safe to call from many processes at once."""
        sets = self._migration_sets()
        if to_version is not None:
            sets = sets[:1]
        try:
            async with self.pool.connection() as conn, conn.transaction():
                for key, package in sets:
                    await store_module.arun(conn, self.store.migrate(key, package, to_version))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise _migration_permission_error(exc) from exc

    def sync_migrate(self, *, to_version: int | None = None) -> None:
        """Sync twin of :meth:`migrate`."""
        sets = self._migration_sets()
        if to_version is not None:
            sets = sets[:1]
        try:
            with self.sync_pool.connection() as conn, conn.transaction():
                for key, package in sets:
                    store_module.run(conn, self.store.migrate(key, package, to_version))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise _migration_permission_error(exc) from exc

    async def is_up_to_date(self) -> bool:
        """True when no migration (core or plugin) is pending."""
        for key, package in self._migration_sets():
            current, latest = await self._run(self.store.migration_state(key, package))
            if current < latest:
                return False
        return True

    # -- queues -----------------------------------------------------------------------

    async def declare(self, queue: Queue, *, upsert: bool = False) -> Queue:
        """Create ``queue`` if missing (replace its settings with ``upsert``); returns the
        queue as stored."""
        return await self._run(self._declare_op(queue, upsert))

    def sync_declare(self, queue: Queue, *, upsert: bool = False) -> Queue:
        """Sync twin of :meth:`declare`."""
        return self._sync_run(self._declare_op(queue, upsert))

    async def declare_ex(
        self,
        cursor: psycopg.AsyncCursor[Any] | psycopg.AsyncConnection[Any],
        queue: Queue,
        *,
        upsert: bool = False,
    ) -> Queue:
        """:meth:`declare` on the caller's connection or cursor, inside its transaction."""
        return await store_module.arun(cursor, self._declare_op(queue, upsert))

    def sync_declare_ex(
        self,
        cursor: psycopg.Cursor[Any] | psycopg.Connection[Any],
        queue: Queue,
        *,
        upsert: bool = False,
    ) -> Queue:
        """Sync twin of :meth:`declare_ex`."""
        return store_module.run(cursor, self._declare_op(queue, upsert))

    def _declare_op(self, queue: Queue, upsert: bool) -> Op[Queue]:
        if not isinstance(queue, Queue):
            raise QueueValidationError(f"declare() needs a Queue, not {queue!r}")
        return self.store.declare_queue(queue, upsert=upsert, notify=self.notifications)

    async def get_queue(self, name: str) -> Queue | None:
        """The declared queue ``name``, or None."""
        return await self._run(self.store.get_queue(validate_queue_name(name)))

    async def get_all_queues(self) -> list[Queue]:
        """Every declared queue."""
        return await self._run(self.store.get_queues())

    async def delete_queue(self, name: str, *, purge_jobs: bool = True) -> bool:
        """Delete a queue and (by default) its jobs; workers stop serving it."""
        op = self.store.delete_queue(
            validate_queue_name(name), purge_jobs=purge_jobs, notify=self.notifications
        )
        return await self._run(op, transaction=True)

    async def pause_queue(self, name: str, *, resume_at: dt.datetime | None = None) -> Queue:
        """Stop workers from fetching ``name``; optionally resume at ``resume_at``."""
        if resume_at is not None and (
            not isinstance(resume_at, dt.datetime) or resume_at.utcoffset() is None
        ):
            raise QueueValidationError("resume_at must be a timezone-aware datetime")
        return await self._set_queue_state(name, Queue.State.PAUSED, resume_at)

    async def resume_queue(self, name: str) -> Queue:
        """Let workers fetch from ``name`` again."""
        return await self._set_queue_state(name, Queue.State.ACTIVE, None)

    async def _set_queue_state(
        self, name: str, state: Queue.State, resume_at: dt.datetime | None
    ) -> Queue:
        op = self.store.set_queue_state(
            validate_queue_name(name), state, resume_at, notify=self.notifications
        )
        queue = await self._run(op)
        if queue is None:
            raise UnknownQueueError([name])
        return queue

    async def get_all_workers(self) -> list[dict[str, Any]]:
        """Registered workers with their tags, queues, heartbeat and leadership."""
        return await self._run(self.store.get_workers())

    # -- push -------------------------------------------------------------------------

    def _push_op(self, jobs: Sequence[Job]) -> Op[list[PushResult] | list[str]]:
        for job in jobs:
            if not isinstance(job, Job):
                raise JobValidationError(f"push() needs Job instances, not {job!r}")
            check_job_arguments(job, self._round_trip)
        for hook in self._pushing_hooks():
            jobs = [hook(job) for job in jobs]
        return self.store.push_jobs(
            jobs, require_queues=self.require_declared_queues, notify=self.notifications
        )

    def _pushing_hooks(self) -> list[Callable[[Job], Job]]:
        """The ``on_job_pushing`` hooks of the plugins that override it."""
        base = _plugin_base().on_job_pushing
        return [
            plugin.on_job_pushing
            for plugin in self.plugins.values()
            if type(plugin).on_job_pushing is not base
        ]

    @staticmethod
    def _check_push(result: list[PushResult] | list[str]) -> list[PushResult]:
        if result and isinstance(result[0], str):
            raise UnknownQueueError([str(name) for name in result])
        return result  # type: ignore[return-value]

    @staticmethod
    def _push_args(queue_or_job: str | Job, job: Job | None) -> Job:
        if isinstance(queue_or_job, str):
            if not isinstance(job, Job):
                raise JobValidationError("push(queue, job) needs a Job as its second argument")
            return job.with_queue(queue_or_job)
        if job is not None:
            raise JobValidationError("push(job) takes one job; use push_many for several")
        if not isinstance(queue_or_job, Job):
            raise JobValidationError(f"push() needs a Job, not {queue_or_job!r}")
        return queue_or_job

    @overload
    async def push(self, job: Job, /) -> Reference: ...

    @overload
    async def push(self, queue: str, job: Job, /) -> Reference: ...

    async def push(self, queue_or_job: str | Job, job: Job | None = None, /) -> Reference:
        """Enqueue one job (``push(job)`` or the seed form ``push("queue", job)``)."""
        the_job = self._push_args(queue_or_job, job)
        result = self._check_push(await self._run(self._push_op([the_job])))
        return result[0].reference

    def sync_push(self, queue_or_job: str | Job, job: Job | None = None, /) -> Reference:
        """Sync twin of :meth:`push`."""
        the_job = self._push_args(queue_or_job, job)
        return self._check_push(self._sync_run(self._push_op([the_job])))[0].reference

    async def push_ex(
        self,
        cursor: psycopg.AsyncCursor[Any] | psycopg.AsyncConnection[Any],
        job: Job,
    ) -> Reference:
        """Enqueue ``job`` on the caller's connection/cursor, inside the caller's
        transaction: the job exists if and only if that transaction commits."""
        result = self._check_push(await store_module.arun(cursor, self._push_op([job])))
        return result[0].reference

    def sync_push_ex(
        self, cursor: psycopg.Cursor[Any] | psycopg.Connection[Any], job: Job
    ) -> Reference:
        """Sync twin of :meth:`push_ex`."""
        return self._check_push(store_module.run(cursor, self._push_op([job])))[0].reference

    async def push_detailed(self, jobs: Sequence[Job]) -> list[PushResult]:
        """Like :meth:`push_many_ex` on a pooled connection, but tells for each job whether
        it was inserted or deduplicated onto a live job with the same ``unique_key``."""
        batch = list(jobs)
        atomic = len(batch) >= store_module.COPY_MIN_JOBS
        return self._check_push(await self._run(self._push_op(batch), transaction=atomic))

    async def push_detailed_ex(
        self,
        cursor: psycopg.AsyncCursor[Any] | psycopg.AsyncConnection[Any],
        jobs: Sequence[Job],
    ) -> list[PushResult]:
        """:meth:`push_detailed` inside the caller's transaction (see :meth:`push_ex`)."""
        return self._check_push(await store_module.arun(cursor, self._push_op(list(jobs))))

    def sync_push_detailed(self, jobs: Sequence[Job]) -> list[PushResult]:
        """Sync twin of :meth:`push_detailed`."""
        return self._check_push(self._sync_run(self._push_op(list(jobs))))

    def sync_push_detailed_ex(
        self, cursor: psycopg.Cursor[Any] | psycopg.Connection[Any], jobs: Sequence[Job]
    ) -> list[PushResult]:
        """Sync twin of :meth:`push_detailed_ex`."""
        return self._check_push(store_module.run(cursor, self._push_op(list(jobs))))

    async def push_many(
        self, jobs: Iterable[Job], *, batch_size: int = 1000
    ) -> AsyncIterator[list[Reference]]:
        """Enqueue many jobs, one transaction per batch; yields each batch's references
        once it is committed. A bad job fails its batch (nothing of it is stored). A big
        batch's transaction is open while ``jobs`` produces it: avoid slow I/O there."""
        for head, rest in self._push_batches(jobs, batch_size):
            if rest is None:  # a small batch: one statement, checked before it runs
                result = self._check_push(await self._run(self._push_op(head)))
                yield [r.reference for r in result]
            else:
                yield await self._run(self._push_streamed_op(head, rest), transaction=True)

    def sync_push_many(
        self, jobs: Iterable[Job], *, batch_size: int = 1000
    ) -> Iterator[list[Reference]]:
        """Sync twin of :meth:`push_many`."""
        for head, rest in self._push_batches(jobs, batch_size):
            if rest is None:
                yield [r.reference for r in self._check_push(self._sync_run(self._push_op(head)))]
            else:
                yield self._sync_run(self._push_streamed_op(head, rest), transaction=True)

    @staticmethod
    def _push_batches(
        jobs: Iterable[Job], batch_size: int
    ) -> Iterator[tuple[list[Job], Iterator[Job] | None]]:
        """Each batch as its first jobs and, when it is big enough for a streamed COPY,
        an iterator over the rest (read while the batch is pushed)."""
        if batch_size < 1:
            raise ConfigurationError("batch_size must be >= 1")
        stream = iter(jobs)
        for first in stream:
            batch = itertools.islice(itertools.chain((first,), stream), batch_size)
            head = list(itertools.islice(batch, store_module.COPY_MIN_JOBS))
            yield head, (batch if len(head) >= store_module.COPY_MIN_JOBS else None)

    def _push_streamed_op(self, head: list[Job], rest: Iterator[Job]) -> Op[list[Reference]]:
        """The store's streamed push of a batch, each job checked and passed through the
        plugins' push hooks as the store reads it."""
        return self.store.push_jobs_streamed(
            self._prepared(itertools.chain(head, rest)),
            require_queues=self.require_declared_queues,
            notify=self.notifications,
        )

    def _prepared(self, jobs: Iterable[Job]) -> Iterator[Job]:
        """What :meth:`_push_op` does to each job, lazily: type and signature checks,
        then the plugins' ``on_job_pushing``. Whether a function has a signature to
        check is looked up once per function."""
        hooks = self._pushing_hooks()
        round_trip = self._round_trip
        signed: dict[str, bool] = {}
        for job in jobs:
            if type(job) is not Job and not isinstance(job, Job):
                raise JobValidationError(f"push() needs Job instances, not {job!r}")
            func = job.func
            check = signed.get(func)
            if check is None:
                check = signed[func] = has_signature(func)
            if check:
                check_job_arguments(job, round_trip)
            for hook in hooks:
                job = hook(job)
            yield job

    async def push_many_ex(
        self,
        cursor: psycopg.AsyncCursor[Any] | psycopg.AsyncConnection[Any],
        jobs: Iterable[Job],
    ) -> list[Reference]:
        """Enqueue many jobs in one statement inside the caller's transaction."""
        result = self._check_push(await store_module.arun(cursor, self._push_op(list(jobs))))
        return [r.reference for r in result]

    def sync_push_many_ex(
        self, cursor: psycopg.Cursor[Any] | psycopg.Connection[Any], jobs: Iterable[Job]
    ) -> list[Reference]:
        """Sync twin of :meth:`push_many_ex`."""
        result = self._check_push(store_module.run(cursor, self._push_op(list(jobs))))
        return [r.reference for r in result]

    # -- reading and controlling jobs ---------------------------------------------------

    async def get_job(self, ref: RefLike) -> QueuedJob | None:
        """The job ``ref`` as stored now, or None if it does not exist (any more)."""
        jobs = await self._run(self.store.get_jobs([Reference(ref)]))
        return jobs[0] if jobs else None

    def sync_get_job(self, ref: RefLike) -> QueuedJob | None:
        """Sync twin of :meth:`get_job`."""
        jobs = self._sync_run(self.store.get_jobs([Reference(ref)]))
        return jobs[0] if jobs else None

    async def get_jobs(self, refs: Iterable[RefLike]) -> list[QueuedJob]:
        """The stored jobs among ``refs`` (missing ones are left out)."""
        return await self._run(self.store.get_jobs([Reference(r) for r in refs]))

    def sync_get_jobs(self, refs: Iterable[RefLike]) -> list[QueuedJob]:
        """Sync twin of :meth:`get_jobs`."""
        return self._sync_run(self.store.get_jobs([Reference(r) for r in refs]))

    async def wait_for_job(
        self,
        ref: RefLike,
        *,
        interval: float = 1,
        timeout: float | None = None,
        states: Iterable[QueuedJob.State | str] | None = None,
    ) -> QueuedJob | None:
        """Wait until the job reaches one of ``states`` (default: finished). Returns the
        job (with its ``result``), or None if it was deleted. Raises
        :class:`TimeoutError` after ``timeout``."""
        jobs = await self.wait_for_jobs([ref], interval=interval, timeout=timeout, states=states)
        return jobs[0] if jobs else None

    async def wait_for_jobs(
        self,
        refs: Iterable[RefLike],
        *,
        interval: float = 1,
        timeout: float | None = None,
        states: Iterable[QueuedJob.State | str] | None = None,
    ) -> list[QueuedJob]:
        """Wait until every job is in ``states`` (default: finished) or deleted; returns
        the jobs that still exist. Wakes when a worker announces a completion (LISTEN),
        and polls at most every ``interval`` seconds as the fallback."""
        wanted = _wanted_states(states)
        pending = {Reference(r) for r in refs}
        deadline = None if timeout is None else time.monotonic() + timeout
        wake = asyncio.Event()
        listener = None
        if self.notifications and pending:
            listener = self._listener = self._listener or _CompletionListener(self)
            listener.add(wake, {str(r) for r in pending})
            await listener.start(5 if timeout is None else min(5, timeout))
        try:
            delay = min(0.01, interval)
            done: dict[Reference, QueuedJob] = {}
            while pending:
                wake.clear()
                pending = _take_finished(await self.get_jobs(pending), wanted, done)
                if not pending:
                    break
                pause = _next_pause(delay, deadline, timeout, len(pending))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await wake.wait()
                delay = min(delay * 2, interval)
            return list(done.values())
        finally:
            if listener is not None:
                listener.remove(wake)

    def sync_wait_for_job(
        self,
        ref: RefLike,
        *,
        interval: float = 1,
        timeout: float | None = None,
        states: Iterable[QueuedJob.State | str] | None = None,
    ) -> QueuedJob | None:
        """Sync twin of :meth:`wait_for_job`."""
        jobs = self.sync_wait_for_jobs([ref], interval=interval, timeout=timeout, states=states)
        return jobs[0] if jobs else None

    def sync_wait_for_jobs(
        self,
        refs: Iterable[RefLike],
        *,
        interval: float = 1,
        timeout: float | None = None,
        states: Iterable[QueuedJob.State | str] | None = None,
    ) -> list[QueuedJob]:
        """Sync twin of :meth:`wait_for_jobs` (it LISTENs on a connection of its own)."""
        wanted = _wanted_states(states)
        pending = {Reference(r) for r in refs}
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._sync_listen() if self.notifications and pending else None
        try:
            delay = min(0.01, interval)
            done: dict[Reference, QueuedJob] = {}
            while pending:
                pending = _take_finished(self.sync_get_jobs(pending), wanted, done)
                if not pending:
                    break
                pause = _next_pause(delay, deadline, timeout, len(pending))
                if conn is None:
                    time.sleep(pause)
                else:
                    try:
                        names = {str(r) for r in pending}
                        for notify in conn.notifies(timeout=pause):
                            if _concerns(notify.payload, names):
                                break
                    except psycopg.Error:  # lost the LISTEN connection: poll
                        conn.close()
                        conn = None
                delay = min(delay * 2, interval)
            return list(done.values())
        finally:
            if conn is not None:
                conn.close()

    def _sync_listen(self) -> psycopg.Connection[Any] | None:
        try:
            conn = psycopg.Connection.connect(self.dsn, autocommit=True)
        except psycopg.Error:
            return None
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.store.done_channel)))
        except psycopg.Error:
            conn.close()
            return None
        return conn

    async def get_result(
        self, ref: RefLike, *, wait: bool = False, timeout: float | None = None
    ) -> Any:
        """The value a succeeded job returned (as stored: JSON). With ``wait``, first
        wait (up to ``timeout``) for the job to finish. Raises
        :class:`~chancy.errors.JobNotFoundError`, :class:`~chancy.errors.JobFailedError`
        (failed or cancelled) or :class:`~chancy.errors.JobNotFinishedError`."""
        job = await (self.wait_for_job(ref, timeout=timeout) if wait else self.get_job(ref))
        return _result_of(ref, job)

    def sync_get_result(
        self, ref: RefLike, *, wait: bool = False, timeout: float | None = None
    ) -> Any:
        """Sync twin of :meth:`get_result`."""
        job = self.sync_wait_for_job(ref, timeout=timeout) if wait else self.sync_get_job(ref)
        return _result_of(ref, job)

    async def cancel_job(self, ref: RefLike) -> bool:
        """Cancel a pending or running job; a running job is interrupted by its worker
        where the executor can. Returns False if the job was not live."""
        previous = await self._run(self.store.cancel_job(Reference(ref), notify=self.notifications))
        return previous is not None

    def sync_cancel_job(self, ref: RefLike) -> bool:
        """Sync twin of :meth:`cancel_job`."""
        return (
            self._sync_run(self.store.cancel_job(Reference(ref), notify=self.notifications))
            is not None
        )

    async def retry_job(self, ref: RefLike) -> bool:
        """Run a finished (failed, cancelled or succeeded) job again now. Returns False if
        the job is not finished, or another live job holds its ``unique_key``."""
        try:
            return await self._run(self.store.retry_job(Reference(ref)))
        except psycopg.errors.UniqueViolation:  # a duplicate was pushed concurrently
            return False


def _wanted_states(states: Iterable[QueuedJob.State | str] | None) -> set[QueuedJob.State]:
    try:
        return {QueuedJob.State(s) for s in states} if states else set(FINISHED_STATES)
    except ValueError as exc:
        raise JobValidationError(f"unknown job state: {exc}") from None


def _concerns(payload: str, names: set[str]) -> bool:
    """Whether a completion notification may concern any of the jobs ``names``."""
    try:
        event = json.loads(payload)
    except ValueError:
        return True
    ids = event.get("j") if isinstance(event, dict) else None
    return not isinstance(ids, list) or not names.isdisjoint(ids)


def _result_of(ref: RefLike, job: QueuedJob | None) -> Any:
    if job is None:
        raise JobNotFoundError(f"job {ref} does not exist (never pushed, or deleted)")
    if job.state == QueuedJob.State.SUCCEEDED:
        return job.result
    if job.state in FINISHED_STATES:
        raise JobFailedError(job)
    raise JobNotFinishedError(f"job {ref} is {job.state.value}: it has no result yet")


class _CompletionListener:
    """One LISTEN connection per app, shared by every ``wait_for_jobs`` call: a
    completion notification wakes the waiters whose jobs it names. If it cannot listen,
    waiters simply poll."""

    def __init__(self, chancy: Chancy) -> None:
        self.chancy = chancy
        self.waiters: dict[asyncio.Event, set[str]] = {}
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def add(self, wake: asyncio.Event, names: set[str]) -> None:
        self.waiters[wake] = names

    def remove(self, wake: asyncio.Event) -> None:
        self.waiters.pop(wake, None)

    async def start(self, timeout: float) -> bool:
        """Make sure the connection listens, waiting up to ``timeout`` seconds for it;
        False if it does not (yet): waiters then poll."""
        if self.task is None or self.task.done():
            self.ready = asyncio.Event()
            self.task = asyncio.create_task(self._listen(), name="chancy-completions")
        if not self.ready.is_set():
            ready = asyncio.ensure_future(self.ready.wait())
            await asyncio.wait(
                {ready, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            ready.cancel()
        return self.ready.is_set()

    async def _listen(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self.chancy.dsn, autocommit=True)
        except psycopg.Error as exc:
            self.chancy.log.warning("cannot LISTEN for completions (polling instead): %s", exc)
            return
        try:
            channel = sql.Identifier(self.chancy.store.done_channel)
            await conn.execute(sql.SQL("LISTEN {}").format(channel))
            self.ready.set()
            async for notify in conn.notifies():
                for wake, names in list(self.waiters.items()):
                    if _concerns(notify.payload, names):
                        wake.set()
        except psycopg.Error as exc:
            self.chancy.log.warning("lost the completion LISTEN connection: %s", exc)
        finally:
            self.ready.clear()
            for wake in list(self.waiters):
                wake.set()  # recheck now, then poll
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _migration_permission_error(exc: psycopg.Error) -> MigrationPermissionError:
    return MigrationPermissionError(
        f"migrations need the right to create and alter tables ({exc.diag.message_primary}): "
        "run migrations as the owner of Chancy's schema; workers and applications need "
        "only SELECT, INSERT, UPDATE and DELETE"
    )


def _socket_has_data(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True if an idle connection's socket is readable: the server sent something
    unasked (an error before closing it) or closed it, or it is already broken."""
    if conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _take_finished(
    jobs: list[QueuedJob], wanted: set[QueuedJob.State], done: dict[Reference, QueuedJob]
) -> set[Reference]:
    """Move the jobs that reached a wanted state into ``done``; the ids still pending."""
    for job in jobs:
        if job.state in wanted:
            done[job.id] = job
    return {job.id for job in jobs if job.id not in done}


def _next_pause(delay: float, deadline: float | None, timeout: float | None, left: int) -> float:
    """How long a wait loop sleeps before it looks again; TimeoutError past its deadline."""
    if deadline is None:
        return delay
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"{left} job(s) did not finish in {timeout} s")
    return min(delay, remaining)


@functools.cache
def _plugin_base() -> type[Plugin]:
    from chancy.plugin import Plugin

    return Plugin
