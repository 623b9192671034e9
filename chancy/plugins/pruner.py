"""Pruner: deletes finished jobs that match a retention rule, in bounded batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chancy import rule as rules
from chancy.errors import ConfigurationError
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.worker import Worker


class Pruner(Plugin):
    """Every ``poll_interval`` seconds the leader deletes up to ``maximum_to_prune``
    finished (succeeded, failed, cancelled) jobs matching ``rule`` — by default those
    finished more than a day ago. Pending, running and retrying jobs are never touched."""

    Rules = rules.Rules

    def __init__(
        self,
        rule: rules.Condition | None = None,
        *,
        maximum_to_prune: int = 10000,
        poll_interval: float = 60,
    ) -> None:
        if maximum_to_prune < 1 or poll_interval <= 0:
            raise ConfigurationError("Pruner needs maximum_to_prune >= 1 and poll_interval > 0")
        self.rule = rule if rule is not None else rules.Age() > 86400
        if not isinstance(self.rule, rules.Condition):
            raise ConfigurationError("Pruner rule must be a rule condition, e.g. Age() > 3600")
        self.maximum_to_prune = maximum_to_prune
        self.poll_interval = poll_interval

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.pruner"

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        while not worker.stopping.is_set():
            await self.wait_for_leader(worker)
            await self.prune(worker, chancy)
            await self.sleep(worker, self.poll_interval)

    async def prune(self, worker: Worker, chancy: Chancy) -> int:
        """Delete one batch now; returns how many jobs were deleted."""
        template, params = self.rule.to_sql()
        deleted = await worker.run_op(
            chancy.store.prune_jobs(worker.worker_id, template, params, self.maximum_to_prune)
        )
        if deleted:
            worker.hub.emit("pruner.deleted", deleted)
        return deleted
