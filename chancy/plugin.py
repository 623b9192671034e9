"""The :class:`Plugin` base class: services that run inside a worker and job hooks."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.job import Job, QueuedJob
    from chancy.store import Outcome
    from chancy.worker import Worker


class Plugin:
    """Extend a worker: ``run`` is a long-lived service, ``on_job_*`` are job hooks.

    A plugin passed to ``Chancy(plugins=[...])`` replaces a default plugin with the same
    :meth:`get_identifier`. Services that must run on one worker only wait for
    :meth:`wait_for_leader` first.
    """

    @classmethod
    def get_identifier(cls) -> str:
        """A stable name; also the key of this plugin's migrations."""
        return f"{cls.__module__}.{cls.__qualname__}"

    def migrations_package(self) -> str | None:
        """Import path of a package holding this plugin's ``NNNN_*.up/down.sql`` files."""
        return None

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        """The plugin's service; restarted with back-off if it raises. Default: nothing."""
        return None

    def on_job_pushing(self, job: Job) -> Job:
        """Called (synchronously, before any SQL) for every job pushed through this Chancy;
        may return a new job, e.g. with tracing context added to its meta."""
        return job

    async def on_job_starting(self, worker: Worker, job: QueuedJob) -> QueuedJob:
        """Called before a claimed job is handed to its executor; may return a new job."""
        return job

    async def on_job_completed(self, worker: Worker, outcome: Outcome) -> Outcome:
        """Called with a job's outcome before it is recorded; may change it (e.g. the
        retry delay)."""
        return outcome

    async def on_job_updated(self, worker: Worker, job: QueuedJob, changes: dict[str, Any]) -> None:
        """Called when a running job reports progress or changes its meta."""
        return None

    async def cleanup(self, worker: Worker) -> None:
        """Called once when the worker stops (after jobs are handed back)."""
        return None

    @staticmethod
    async def wait_for_leader(worker: Worker) -> None:
        """Block until ``worker`` holds the leadership lease."""
        await worker.is_leader.wait()

    @staticmethod
    async def sleep(worker: Worker, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when the worker begins to stop."""
        try:
            async with asyncio.timeout(seconds):
                await worker.stopping.wait()
        except TimeoutError:
            pass
