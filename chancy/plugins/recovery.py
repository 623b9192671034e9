"""Recovery: running jobs of workers that stopped heartbeating go back in line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chancy.errors import ConfigurationError
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.worker import Worker


class Recovery(Plugin):
    """Every ``poll_interval`` seconds the leader returns jobs whose worker's heartbeat
    expired: to ``retrying``, or ``failed`` when that attempt was their last (attempts are
    counted at claim, so a job that kills its worker cannot loop forever)."""

    def __init__(self, poll_interval: float = 5, batch_size: int = 1000) -> None:
        if poll_interval <= 0 or batch_size < 1:
            raise ConfigurationError("Recovery needs poll_interval > 0 and batch_size >= 1")
        self.poll_interval = poll_interval
        self.batch_size = batch_size

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.recovery"

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        while not worker.stopping.is_set():
            await self.wait_for_leader(worker)
            await self.recover(worker, chancy)
            await self.sleep(worker, self.poll_interval)

    async def recover(self, worker: Worker, chancy: Chancy) -> int:
        """One pass: recover orphaned jobs and forget long-dead workers."""
        total = 0
        while worker.is_leader.is_set():
            recovered = await worker.run_op(
                chancy.store.recover_orphaned_jobs(worker.worker_id, self.batch_size)
            )
            for ref, state in recovered:
                worker.hub.emit("job.recovered", {"id": ref, "state": state})
            total += len(recovered)
            if len(recovered) < self.batch_size:
                break
        await worker.run_op(chancy.store.delete_expired_workers(worker.worker_id, grace=3600))
        if total:
            worker.log.warning("recovered %d job(s) from dead workers", total)
        return total
