"""Reprioritize: raise the priority of jobs that match a rule, such as jobs waiting long."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chancy import rule as rules
from chancy.errors import ConfigurationError
from chancy.job import PRIORITY_MAX, PRIORITY_MIN
from chancy.plugin import Plugin
from chancy.store import reprioritize as reprioritize_store

if TYPE_CHECKING:
    from chancy.app import Chancy
    from chancy.worker import Worker


class Reprioritize(Plugin):
    """Every ``check_interval`` seconds the leader adds ``priority_increase`` to the
    priority of pending and retrying jobs matching ``rule`` (for example
    ``Reprioritize.Rules.Age() > 600``: waiting for more than ten minutes), in statements
    of at most ``batch_size`` jobs.

    Each job is reprioritized at most once: the change is recorded in its meta
    (``reprioritized_at``, ``reprioritized_from``) and such jobs are never picked again,
    so a job that keeps matching is not raised on every check. Priorities stay within the
    column's range. A negative ``priority_increase`` lowers priorities instead.
    """

    Rules = rules.Rules

    def __init__(
        self,
        rule: rules.Condition,
        *,
        check_interval: float = 60,
        priority_increase: int = 1,
        batch_size: int = 1000,
    ) -> None:
        if not isinstance(rule, rules.Condition):
            raise ConfigurationError("Reprioritize needs a rule condition, e.g. Age() > 600")
        if not check_interval > 0:
            raise ConfigurationError("Reprioritize needs check_interval > 0")
        if (
            isinstance(priority_increase, bool)
            or not isinstance(priority_increase, int)
            or priority_increase == 0
            or abs(priority_increase) > PRIORITY_MAX - PRIORITY_MIN
        ):
            raise ConfigurationError(
                f"priority_increase must be a non-zero int, not {priority_increase!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError("Reprioritize needs batch_size >= 1")
        self.rule = rule
        self.check_interval = check_interval
        self.priority_increase = priority_increase
        self.batch_size = batch_size

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.reprioritize"

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        while not worker.stopping.is_set():
            await self.wait_for_leader(worker)
            await self.reprioritize(worker, chancy)
            await self.sleep(worker, self.check_interval)

    async def reprioritize(self, worker: Worker, chancy: Chancy) -> int:
        """One pass, batch after batch; returns how many jobs were changed. Ends because
        every batch marks its jobs, which later batches never pick again."""
        template, params = self.rule.to_sql()
        total = 0
        while worker.is_leader.is_set() and not worker.stopping.is_set():
            changed = await worker.run_op(
                reprioritize_store.reprioritize_jobs(
                    chancy.store,
                    worker.worker_id,
                    template,
                    params,
                    increase=self.priority_increase,
                    limit=self.batch_size,
                )
            )
            if changed:
                worker.hub.emit("reprioritize.changed", changed)
            total += len(changed)
            if len(changed) < self.batch_size:
                break
        return total
