"""Helpers for the Django tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from chancy import Chancy, QueuedJob, Worker


def work_until_finished(
    chancy: Chancy, refs: Iterable[str], *, timeout: float = 60
) -> list[QueuedJob]:
    """Run a worker in this process until the jobs ``refs`` have finished."""

    async def main() -> list[QueuedJob]:
        async with chancy:
            worker = Worker(
                chancy,
                register_signal_handlers=False,
                heartbeat_poll_interval=0.5,
                heartbeat_timeout=10,
                queue_change_poll_interval=0.5,
                shutdown_timeout=5,
            )
            async with worker:
                return await chancy.wait_for_jobs(list(refs), timeout=timeout)

    return asyncio.run(main())
