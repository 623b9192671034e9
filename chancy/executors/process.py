"""Run jobs in a pool of long-lived child processes (the default executor).

Each child owns a socket to the worker and a queue of jobs: the worker sends several jobs
per message, a child runs its next job without waiting for the worker, and the worker
reads every reply a child has written in one go. Messages are JSON lines, never pickle.
A queue holds ``1 + prefetch / concurrency`` jobs, or by default (no ``prefetch`` option)
up to ``MAX_DEPTH`` while recent jobs are short enough to fit ``QUEUE_SECONDS``.

A child may start a job only by taking its permit, a cell in memory it shares with the
worker, under a per-child lock. So the worker knows which job a child started: it can take
back a job that has not started (to cancel it, to hand it back at shutdown, or to give it
to a sibling when it waits behind a long job), and a child that dies (``os._exit``, a
segfault, the OOM killer) fails only the job it was running ("worker died"); the jobs
queued behind it run on another child with their attempt unchanged. Time limits raise
:class:`~chancy.errors.JobTimeoutError` inside the child via ``SIGALRM``; a child that does
not stop within ``kill_grace`` seconds after its deadline, a cancellation or a shutdown is
killed. Memory limits set ``RLIMIT_AS`` for the job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
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

log = logging.getLogger(__name__)

CANCEL_SIGNAL = signal.SIGUSR1
#: The signals a child raises job-ending exceptions from.
_JOB_SIGNALS = {signal.SIGALRM, CANCEL_SIGNAL}

# Memory shared with each child: cell 0 holds the sequence number of the job the worker
# asks to stop; the others are a ring of start permits. The worker writes a job's
# sequence number into its permit cell before sending it; the child swaps it for _TAKEN
# when it starts the job, the worker for _REVOKED when it takes the job back. Both swaps
# happen under the child's lock, so exactly one of them wins.
_CANCEL = 0
_RING = 256
_TAKEN = -1
_REVOKED = -2
#: A job running this long is long: nothing more is queued behind it, and the jobs
#: waiting behind it move to a child with room.
LONG_JOB_SECONDS = 0.05
#: Without a ``prefetch`` option, a child's queue grows to this many jobs at most ...
MAX_DEPTH = 128
#: ... while the recent jobs' average duration fits that many in about this long.
QUEUE_SECONDS = 0.02
#: How long the event loop waits for a child's lock (held for a few bytecodes).
_LOCK_WAIT = 0.002
_READ_SIZE = 1 << 18


def _preload_chancy() -> None:
    """Have the fork server import Chancy (and so psycopg) once: each child is then a
    fork with it loaded instead of an interpreter that imports it all again. Left alone
    if the application chose its own preload list."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_preload_modules", None) == ["__main__"]:
        forkserver.set_forkserver_preload(["__main__", __name__])


class _Slot:
    """A job sent to a child and not reported yet."""

    __slots__ = ("job", "kind", "seconds", "seq", "timer")

    def __init__(self, seq: int, job: QueuedJob, seconds: float | None) -> None:
        self.seq = seq
        self.job = job
        self.seconds = seconds
        #: Why the worker interrupted it, if it did.
        self.kind: Kind | None = None
        #: Kills the child if the job overstays its time limit or an interruption.
        self.timer: asyncio.TimerHandle | None = None


class _Child:
    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        conn: multiprocessing.connection.Connection,
        cells: Any,
        lock: Any,
    ) -> None:
        self.process = process
        self.conn = conn
        self.fd = conn.fileno()
        self.cells = cells
        self.lock = lock
        #: Jobs sent and not reported, in the order the child runs them.
        self.slots: collections.deque[_Slot] = collections.deque()
        self.next_seq = 1
        self.jobs_done = 0
        #: Loop time at which the first slot became first (it started about then).
        self.head_since = 0.0
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.alive = True


class ProcessExecutor(Executor):
    """A pool of ``concurrency`` child processes (CPU count by default).

    Options: ``start_method`` (``forkserver`` on Linux, else ``spawn``), ``kill_grace``
    seconds (default 5), ``max_jobs_per_child`` (recycle a child after N jobs; default
    never), ``initializer`` (import path of a function each child calls once before its
    first job, e.g. ``chancy.contrib.django.setup_child``), ``prefetch`` (claimed jobs held
    beyond one per child, queued in the children; 0 claims only as many jobs as there are
    idle children). Without it, each child holds 4 jobs, and up to 128 while jobs are
    short (about 20 ms of work); a child busy with a job for over 50 ms holds only it.
    """

    default_concurrency = os.cpu_count() or 2
    #: A child that finishes a job starts the next one without waiting for the worker.
    default_prefetch_factor = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        method = self.options.get("start_method") or (
            "forkserver" if sys.platform.startswith("linux") else "spawn"
        )
        self._context = multiprocessing.get_context(method)
        if method == "forkserver":
            _preload_chancy()
        self._kill_grace = float(self.options.get("kill_grace", 5))
        self._max_jobs: int | None = self.options.get("max_jobs_per_child")
        #: Jobs a child holds at most: the one it runs and those queued behind it.
        self._base_depth = -(-super().capacity // self.concurrency)
        self._depth = self._base_depth
        #: Without an explicit ``prefetch``, the depth follows the jobs' duration.
        self._adaptive_depth = "prefetch" not in self.options
        self._job_seconds = 1.0  # a moving average, from the children's replies
        self._children: list[_Child] = []
        self._spawning = 0
        self._assigned: dict[Reference, tuple[_Child, _Slot]] = {}
        self._assign_soon = False
        self._rebalance_at: float | None = None
        self._rebalance_timer: asyncio.TimerHandle | None = None
        self._releasing = False
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def capacity(self) -> int:
        if not self._children:
            # Claim nothing while no child can run it (at start, or after the last one
            # died): a child's arrival sets slot_freed, which wakes the fetch loop.
            self._start_child()
            return 0
        if not self._adaptive_depth:
            return super().capacity
        # A child busy with a long job holds only that one: nothing waits behind it.
        now = self.worker.loop.time()
        total = (self.concurrency - len(self._children)) * self._depth
        for child in self._children:
            total += 1 if self._is_long(child, now) else self._depth
        return total

    @property
    def buffered(self) -> int:
        """Claimed jobs not started yet (as far as the worker knows): in the buffer or
        queued in a child behind its first job."""
        return len(self._buffer) + sum(max(len(c.slots) - 1, 0) for c in self._children)

    def _observe(self, seconds: float) -> None:
        """Fold a job's duration into the average that sizes the children's queues: short
        jobs need deep queues so that children never wait for a fetch; long ones keep
        the base depth, so that claimed jobs do not wait here while other workers idle."""
        self._job_seconds += (seconds - self._job_seconds) / 16
        if self._adaptive_depth:
            fit = int(QUEUE_SECONDS / max(self._job_seconds, 1e-6))
            self._depth = max(self._base_depth, min(fit, MAX_DEPTH))

    # -- dispatch ---------------------------------------------------------------------

    async def push(self, job: QueuedJob) -> None:
        """Queue ``job``; the jobs pushed in one loop iteration go out in one message per
        child."""
        self.running[job.id] = job
        self.idle.clear()
        self._buffer[job.id] = job
        self._schedule_assign()

    async def start_job(self, job: QueuedJob) -> None:
        await self.push(job)

    def _fill_slots(self) -> None:
        self._schedule_assign()

    def _schedule_assign(self) -> None:
        if not self._assign_soon:
            self._assign_soon = True
            self.worker.loop.call_soon(self._assign)

    def _is_long(self, child: _Child, now: float) -> bool:
        return bool(child.slots) and now - child.head_since >= LONG_JOB_SECONDS

    def _room(self, child: _Child, now: float) -> int:
        if not child.alive or self._is_long(child, now):
            return 0
        room = self._depth - len(child.slots)
        if self._max_jobs:
            room = min(room, self._max_jobs - child.jobs_done - len(child.slots))
        if child.slots and child.next_seq - child.slots[0].seq >= _RING:
            return 0  # its oldest job's permit cell would be reused
        return room

    def _assign(self) -> None:
        """Send buffered jobs to the children with room (the least busy first) and start
        the children the backlog needs."""
        self._assign_soon = False
        if self._closing or self.worker.stopping.is_set():
            self.release_buffered()
            return
        loop = self.worker.loop
        now = loop.time()
        batches: dict[_Child, list[_Slot]] = {}
        rooms = {child: self._room(child, now) for child in self._children}
        while self._buffer:
            child = max(rooms, key=rooms.__getitem__, default=None)
            if child is None or rooms[child] <= 0:
                break
            job = self._take_buffered()
            rooms[child] -= 1
            batches.setdefault(child, []).append(self._enqueue(child, job, now))
        for child, slots in batches.items():
            self._send(child, slots)
        self._spawn_if_needed()
        self._plan_rebalance(now)

    def _enqueue(self, child: _Child, job: QueuedJob, now: float) -> _Slot:
        seq = child.next_seq
        child.next_seq += 1
        slot = _Slot(seq, job, time_limit(job))
        child.cells[1 + seq % _RING] = seq  # its permit, before the child can see the job
        child.slots.append(slot)
        self._assigned[job.id] = (child, slot)
        if len(child.slots) == 1:
            self._became_first(child, now)
        return slot

    def _became_first(self, child: _Child, now: float) -> None:
        child.head_since = now
        slot = child.slots[0]
        if slot.seconds is not None and slot.timer is None:
            # The child raises at the deadline itself; this is the backstop if it cannot.
            slot.timer = self.worker.loop.call_later(
                slot.seconds + self._kill_grace, self._kill, child, slot, Kind.TIMEOUT
            )

    def _send(self, child: _Child, slots: list[_Slot]) -> None:
        messages = [
            {
                "seq": slot.seq,
                "id": slot.job.id.identifier,
                "func": slot.job.func,
                "kwargs": slot.job.kwargs,
                "meta": slot.job.meta,
                "queue": slot.job.queue,
                "attempts": slot.job.attempts,
                "max_attempts": slot.job.max_attempts,
                "priority": slot.job.priority,
                "time_limit": slot.seconds,
                "memory_limit": memory_limit(slot.job),
            }
            for slot in slots
        ]
        self._write(child, json.dumps(messages, default=str).encode() + b"\n")

    def _write(self, child: _Child, data: bytes) -> None:
        if child.outbox:
            child.outbox += data
            return
        try:
            written = os.write(child.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._child_died(child)
            return
        if written < len(data):
            # A child busy with a long job reads its socket later: never block the loop.
            child.outbox += data[written:]
            self.worker.loop.add_writer(child.fd, self._on_writable, child)

    def _on_writable(self, child: _Child) -> None:
        try:
            written = os.write(child.fd, child.outbox)
        except BlockingIOError:
            return
        except OSError:
            self._child_died(child)
            return
        del child.outbox[:written]
        if not child.outbox:
            self.worker.loop.remove_writer(child.fd)

    # -- children ---------------------------------------------------------------------

    def _spawn_if_needed(self) -> None:
        """Start children while jobs wait (in the buffer or behind another job)."""
        waiting = len(self._buffer) + sum(max(len(c.slots) - 1, 0) for c in self._children)
        while (
            len(self._children) + self._spawning < self.concurrency
            and waiting > self._spawning * self._depth
            and self._start_child()
        ):
            pass

    def _start_child(self) -> bool:
        # While no child is up, one start at a time: the first also starts the fork server.
        if self._closing or self.worker.stopping.is_set():
            return False
        if self._spawning and not self._children:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._spawning += 1
        task = loop.create_task(self._spawn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _spawn(self) -> None:
        try:
            # In a thread, so that start-up never blocks the event loop.
            child = await asyncio.to_thread(self._spawn_sync)
        except Exception:
            self._spawning -= 1
            self._spawn_failed(traceback.format_exc())
            return
        self._spawning -= 1
        if self._closing:
            self._discard(child)
            return
        self._children.append(child)
        self.worker.loop.add_reader(child.fd, self._on_readable, child)
        self.slot_freed.set()
        self._rebalance()

    def _spawn_sync(self) -> _Child:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        cells = self._context.RawArray("q", 1 + _RING)
        lock = self._context.Lock()
        process = self._context.Process(  # type: ignore[attr-defined]
            target=child_main,
            args=(
                child_conn,
                list(sys.path),
                os.getpid(),
                self.options.get("initializer"),
                cells,
                lock,
            ),
            name=f"chancy-{self.queue.name}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        os.set_blocking(parent_conn.fileno(), False)
        return _Child(process, parent_conn, cells, lock)

    def _spawn_failed(self, error: str) -> None:
        log.error("could not start a child process for queue %s:\n%s", self.queue.name, error)
        if self._children or self._spawning:
            return  # the others serve the buffer
        while self._buffer:
            self.report(self._take_buffered(), Kind.ERROR, error=error)

    def _discard(self, child: _Child) -> None:
        child.alive = False
        if child in self._children:
            self._children.remove(child)
        loop = self.worker.loop
        with contextlib.suppress(Exception):
            loop.remove_reader(child.fd)
        with contextlib.suppress(Exception):
            loop.remove_writer(child.fd)
        with contextlib.suppress(Exception):
            if child.process.is_alive():
                child.process.kill()
        with contextlib.suppress(Exception):
            child.conn.close()

    # -- replies ----------------------------------------------------------------------

    def _on_readable(self, child: _Child) -> None:
        if self._read_replies(child) is None:
            self._child_died(child)

    def _read_replies(self, child: _Child) -> bool | None:
        """Handle the complete reply lines the socket holds: True if it may hold more,
        False if it had nothing to read, None at the end of the stream."""
        try:
            data = os.read(child.fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            return None
        child.inbox += data
        if b"\n" in data:
            *lines, rest = child.inbox.split(b"\n")
            child.inbox = rest
            for line in lines:
                self._on_message(child, json.loads(line))
                if not child.alive:
                    break
        return True

    def _on_message(self, child: _Child, reply: dict[str, Any]) -> None:
        seq = reply.get("seq")
        slot = next((s for s in child.slots if s.seq == seq), None)
        if slot is None:
            return
        job = slot.job
        progress = reply.get("progress")
        if progress is not None:
            self.worker.set_progress(job, progress["percent"], progress.get("message"))
        if "kind" not in reply:  # a progress report: the job runs on
            return
        first = child.slots[0] is slot
        child.slots.remove(slot)
        if slot.timer is not None:
            slot.timer.cancel()
        self._assigned.pop(job.id, None)
        child.jobs_done += 1
        if first and child.slots:
            self._became_first(child, self.worker.loop.time())
        self._observe(float(reply.get("elapsed") or 0))
        kind = Kind(reply["kind"])
        if kind is Kind.CANCELLED and slot.kind is not None:
            kind = slot.kind
        self.report(
            job,
            kind,
            result=reply.get("result"),
            error=reply.get("error"),
            meta=reply.get("meta"),
            delay=float(reply.get("delay") or 0),
            exception=reply.get("exception"),
        )
        if not child.slots and (
            self._closing or (self._max_jobs and child.jobs_done >= self._max_jobs)
        ):
            self._discard(child)
            self._schedule_assign()

    def _child_died(self, child: _Child) -> None:
        # Noticed by a failed write, the replies it wrote before it died may still wait
        # in the socket: the jobs they report ended, whatever killed the child after.
        while child.alive and self._read_replies(child):
            pass
        if not child.alive:
            return
        self._discard(child)
        slots, child.slots = list(child.slots), collections.deque()
        started = [s for s in slots if child.cells[1 + s.seq % _RING] == _TAKEN]
        unstarted = [s for s in slots if s not in started]
        if not started and unstarted and child.jobs_done == 0:
            # It died before starting anything (an initializer that crashed, say): charge
            # its first job, so that a child that cannot start does not loop forever.
            started, unstarted = unstarted[:1], unstarted[1:]
        for slot in slots:
            if slot.timer is not None:
                slot.timer.cancel()
            self._assigned.pop(slot.job.id, None)
        # Never started: still claimed, attempt unchanged; they run on another child.
        self._buffer_first(
            slot.job for slot in unstarted if self.running.get(slot.job.id) is slot.job
        )
        for slot in started:
            kind = slot.kind or Kind.DIED
            if kind is Kind.DIED:
                error = (
                    f"chancy.errors.WorkerDiedError: the process running {slot.job.func} died "
                    f"(exit code {child.process.exitcode})"
                )
            else:
                error = interrupt_message(kind, slot.job)
            self.report(slot.job, kind, error=error)
        self._schedule_assign()

    def _kill(self, child: _Child, slot: _Slot, kind: Kind) -> None:
        slot.timer = None
        if slot not in child.slots:
            return
        slot.kind = slot.kind or kind
        with contextlib.suppress(Exception):
            child.process.kill()

    # -- taking jobs back -------------------------------------------------------------

    def _revoke(self, child: _Child, slots: list[_Slot]) -> list[_Slot] | None:
        """Take back those of ``slots`` the child has not started; None when its lock
        is busy (try again later)."""
        if not child.alive:
            return []
        if not child.lock.acquire(True, _LOCK_WAIT):
            return None
        try:
            revoked = []
            for slot in slots:
                cell = 1 + slot.seq % _RING
                if child.cells[cell] == slot.seq:
                    child.cells[cell] = _REVOKED
                    revoked.append(slot)
        finally:
            child.lock.release()
        for slot in revoked:
            first = child.slots[0] is slot
            child.slots.remove(slot)
            self._assigned.pop(slot.job.id, None)
            if slot.timer is not None:
                slot.timer.cancel()
                slot.timer = None
            if first and child.slots:
                self._became_first(child, self.worker.loop.time())
        return revoked

    def _plan_rebalance(self, now: float) -> None:
        """Look again when a job with others queued behind it becomes long (and every
        ``LONG_JOB_SECONDS`` while such jobs wait, until they find room)."""
        due: float | None = None
        for child in self._children:
            if len(child.slots) > 1:
                at = child.head_since + LONG_JOB_SECONDS
                if at <= now:
                    at = now + LONG_JOB_SECONDS
                due = at if due is None else min(due, at)
        if due is None or (self._rebalance_at is not None and self._rebalance_at <= due):
            return
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()
        self._rebalance_at = due
        self._rebalance_timer = self.worker.loop.call_at(due, self._rebalance)

    def _rebalance(self) -> None:
        """Move jobs waiting behind a long job to children with room (or to be)."""
        self._rebalance_timer = None
        self._rebalance_at = None
        now = self.worker.loop.time()
        room = sum(self._room(child, now) for child in self._children)
        room += (self.concurrency - len(self._children) - self._spawning) * self._depth
        moved: list[QueuedJob] = []
        for child in list(self._children):
            if room <= 0:
                break
            if len(child.slots) < 2 or not self._is_long(child, now):
                continue
            # The oldest waiting jobs move first; a busy lock is tried on the next look.
            revoked = self._revoke(child, list(child.slots)[1 : 1 + room]) or []
            moved.extend(slot.job for slot in revoked)
            room -= len(revoked)
        self._buffer_first(moved)
        self._assign()

    async def interrupt(self, ref: Reference, kind: Kind) -> None:
        entry = self._assigned.get(ref)
        if entry is None:
            return await super().interrupt(ref, kind)
        child, slot = entry
        revoked = self._revoke(child, [slot])
        give_up = self.worker.loop.time() + self._kill_grace
        while revoked is None:
            if self.worker.loop.time() > give_up:
                # A child stopped while it held its lock: its death settles the job.
                with contextlib.suppress(Exception):
                    child.process.kill()
            await asyncio.sleep(0.01)
            if self._assigned.get(ref) is not entry:
                return await self.interrupt(ref, kind)  # reported, or back in the buffer
            revoked = self._revoke(child, [slot])
        if revoked:
            self.report(slot.job, kind, error=interrupt_message(kind, slot.job))
            return None
        # It started: the child raises in it if it still runs, and is killed otherwise.
        slot.kind = kind
        child.cells[_CANCEL] = slot.seq
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(child.process.pid or 0, CANCEL_SIGNAL)
        if slot.timer is not None:
            slot.timer.cancel()
        slot.timer = self.worker.loop.call_later(self._kill_grace, self._kill, child, slot, kind)
        return None

    def release_buffered(self) -> None:
        """Hand back every job not started yet, in the buffer or queued in a child."""
        if self._releasing:
            return
        self._releasing = True
        try:
            super().release_buffered()
            for child in list(self._children):
                for slot in self._revoke(child, list(child.slots)) or []:
                    self.report(
                        slot.job,
                        Kind.INTERRUPTED,
                        error=interrupt_message(Kind.INTERRUPTED, slot.job),
                    )
        finally:
            self._releasing = False

    def kill_all(self) -> None:
        """Kill every child at once (forced shutdown)."""
        for child in self._children:
            with contextlib.suppress(Exception):
                child.process.kill()

    async def stop(self) -> None:
        self._closing = True
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()
            self._rebalance_timer = None
        for child in list(self._children):
            for slot in child.slots:
                if slot.timer is not None:
                    slot.timer.cancel()
            self._discard(child)


# -- inside the child process ------------------------------------------------------------

#: The cells shared with the worker, and the sequence number of the running job (0 when
#: none runs): the signal handlers raise only into the job they are meant for.
_cells: Any = None
_running = 0


def _raise_cancelled(signum: int, frame: FrameType | None) -> None:
    if _running and _cells[_CANCEL] == _running:
        raise JobCancelledError("job interrupted by its worker")


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    if _running:
        raise JobTimeoutError("job exceeded its time limit")


def child_main(
    conn: multiprocessing.connection.Connection,
    path: list[str],
    worker_pid: int,
    initializer: str | None,
    cells: Any,
    lock: Any,
) -> None:
    """Run the jobs sent by the worker over ``conn``, in order, until it closes."""
    global _cells
    sys.path[:] = path
    threading.Thread(target=_exit_with_worker, args=(worker_pid,), daemon=True).start()
    # Ctrl-C and a stop signal sent to the whole process group (as systemd does) are for
    # the worker, which decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _cells = cells
    signal.signal(CANCEL_SIGNAL, _raise_cancelled)
    signal.signal(signal.SIGALRM, _raise_timeout)
    if initializer:
        import_function(initializer)()
    resource: Any = None
    with contextlib.suppress(ImportError):
        import resource
    fd = conn.fileno()
    queue: collections.deque[dict[str, Any]] = collections.deque()
    inbox = bytearray()
    while True:
        if not queue:
            try:
                data = os.read(fd, _READ_SIZE)
            except OSError:
                return
            if not data:
                return
            inbox += data
            if b"\n" in data:
                *lines, rest = inbox.split(b"\n")
                inbox = rest
                for line in lines:
                    queue.extend(json.loads(line))
            continue
        message = queue.popleft()
        seq = message["seq"]
        cell = 1 + seq % _RING
        with lock:
            if cells[cell] != seq:
                continue  # taken back by the worker
            cells[cell] = _TAKEN
        reply = _run_guarded(message, resource, fd)
        try:
            _write_all(fd, _encode_reply(reply))
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _PipeProgress:
    """Sends a job's progress to the worker at most every ``interval`` seconds; the last
    report not yet sent goes with the job's final reply."""

    def __init__(self, fd: int, seq: int) -> None:
        self.fd = fd
        self.seq = seq
        self.unsent: dict[str, Any] | None = None
        self.last_sent = 0.0
        self.interval = 0.1

    def __call__(self, percent: float, message: str | None) -> None:
        self.unsent = {"percent": percent, "message": message}
        now = time.monotonic()
        if now - self.last_sent >= self.interval:
            self.last_sent = now
            report, self.unsent = self.unsent, None
            payload = json.dumps({"seq": self.seq, "progress": report}).encode() + b"\n"
            # A time limit or cancellation raising in the middle of a write would leave
            # half a message on the socket: hold those signals until it is written.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
            try:
                with contextlib.suppress(OSError):
                    _write_all(self.fd, payload)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _run_guarded(message: dict[str, Any], resource: Any, fd: int | None) -> dict[str, Any]:
    global _running
    try:
        return _child_run(message, resource, fd)
    except (JobCancelledError, JobTimeoutError) as exc:
        # Raised by a signal that came after the job's own code ended.
        kind = Kind.TIMEOUT if isinstance(exc, JobTimeoutError) else Kind.CANCELLED
        return {"seq": message["seq"], "kind": kind.value, "error": traceback.format_exc()}
    finally:
        _running = 0


def _child_run(message: dict[str, Any], resource: Any, fd: int | None = None) -> dict[str, Any]:
    global _running
    seq = message["seq"]
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
    reply: dict[str, Any] = {"seq": seq}
    progress = _PipeProgress(fd, seq) if fd is not None else None
    token = install_sink(progress)
    started = time.perf_counter()
    try:
        if memory and resource is not None:
            old_limit = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (int(memory), old_limit[1]))
        # A previous job may have installed handlers of its own.
        if signal.getsignal(CANCEL_SIGNAL) is not _raise_cancelled:
            signal.signal(CANCEL_SIGNAL, _raise_cancelled)
        if seconds and signal.getsignal(signal.SIGALRM) is not _raise_timeout:
            signal.signal(signal.SIGALRM, _raise_timeout)
        _running = seq
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, float(seconds))
        func, kwargs = prepare_call(job)
        result = func(**kwargs)
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
        _running = 0
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
        reset_sink(token)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
    reply["elapsed"] = time.perf_counter() - started
    reply["meta"] = dict(job.meta)
    if progress is not None and progress.unsent is not None:
        reply["progress"] = progress.unsent
    return reply


def _encode_reply(reply: dict[str, Any]) -> bytes:
    """Encode once; what JSON cannot hold goes as its repr (the worker stores it so)."""
    try:
        return json.dumps(reply, default=repr).encode() + b"\n"
    except ValueError:  # a circular structure in the result or meta
        reply.update(result=repr(reply.get("result")), meta=repr(reply.get("meta")))
        return json.dumps(reply, default=repr).encode() + b"\n"
