"""Leadership: at most one worker holds a lease row; leader-only services wait for it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from chancy.errors import ConfigurationError
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.worker import Worker


class Leadership(Plugin):
    """Renews the lease every ``poll_interval`` seconds; it lapses ``timeout`` seconds
    (database time) after the last renewal. Only the owner renews it; a clean stop
    releases it so another worker takes over at its next poll."""

    def __init__(self, poll_interval: float = 5, timeout: float = 15) -> None:
        if not 0 < poll_interval < timeout:
            raise ConfigurationError("Leadership needs 0 < poll_interval < timeout")
        self.poll_interval = poll_interval
        self.timeout = timeout

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.leadership"

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        renewed_at = 0.0
        try:
            while not worker.stopping.is_set():
                # A paused (SIGSTOP) or partitioned leader must not act on a stale lease.
                if worker.is_leader.is_set() and time.monotonic() - renewed_at > self.timeout:
                    worker.is_leader.clear()
                    worker.hub.emit("leadership.lost", worker.worker_id)
                try:
                    held = await worker.run_op(
                        chancy.store.acquire_lease(worker.worker_id, self.timeout)
                    )
                except Exception:
                    worker.is_leader.clear()
                    raise
                if held:
                    renewed_at = time.monotonic()
                    if not worker.is_leader.is_set():
                        worker.is_leader.set()
                        worker.hub.emit("leadership.gained", worker.worker_id)
                elif worker.is_leader.is_set():
                    worker.is_leader.clear()
                    worker.hub.emit("leadership.lost", worker.worker_id)
                await self.sleep(worker, self.poll_interval)
        finally:
            if worker.stopping.is_set():
                # Hand over at once: a stopping worker does no leader work.
                await self.cleanup(worker)

    async def cleanup(self, worker: Worker) -> None:
        worker.is_leader.clear()
        await worker.run_op(worker.chancy.store.release_lease(worker.worker_id))
