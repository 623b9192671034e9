"""RetryPlugin: exponential back-off with jitter between attempts."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from chancy.errors import ConfigurationError
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.store import Outcome
    from chancy.worker import Worker

DEFAULTS: dict[str, Any] = {
    "backoff": 1,
    "backoff_factor": 2,
    "backoff_limit": 300,
    "backoff_jitter": [1, 5],
}


class RetryPlugin(Plugin):
    """Delays a failed job's next attempt by ``backoff * backoff_factor ** (attempt - 1)``
    seconds, capped at ``backoff_limit``, plus a random jitter in ``backoff_jitter``
    (``[min, max]`` seconds). Per-job settings come from ``job.meta["retry_settings"]``."""

    def __init__(self, **defaults: Any) -> None:
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise ConfigurationError(f"unknown retry settings: {sorted(unknown)}")
        self.defaults = {**DEFAULTS, **defaults}

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.retry"

    def delay_for(self, attempt: int, settings: dict[str, Any] | None = None) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        merged = {**self.defaults, **(settings or {})}
        base = float(merged["backoff"]) * float(merged["backoff_factor"]) ** max(attempt - 1, 0)
        delay = min(base, float(merged["backoff_limit"]))
        low, high = merged["backoff_jitter"]
        return delay + random.uniform(float(low), float(high))

    async def on_job_completed(self, worker: Worker, outcome: Outcome) -> Outcome:
        if outcome.state == "retrying":
            settings = outcome.job.meta.get("retry_settings")
            outcome.delay = self.delay_for(
                outcome.job.attempts, settings if isinstance(settings, dict) else None
            )
        return outcome
