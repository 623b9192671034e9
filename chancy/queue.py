"""The :class:`Queue` value type: how a named queue is served by workers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import re
from collections.abc import Mapping
from typing import Any

from chancy.errors import QueueValidationError
from chancy.job import validate_queue_name

_INT32_MAX = 2**31 - 1

#: Import path of the default executor (a pool of processes).
DEFAULT_EXECUTOR = "chancy.executors.process.ProcessExecutor"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Queue:
    """A named queue and how workers serve it. Lives in the database once declared.

    ``concurrency`` is per worker (``None`` lets the executor choose); ``tags`` are regexes
    matched against worker tags; ``polling_interval`` is how often an idle worker checks for
    jobs when no notification arrives.

    ``rate_limit`` jobs at most start per fixed window of ``rate_limit_window`` seconds,
    across all workers. ``concurrency_key_limit`` is how many jobs sharing a
    ``Job.concurrency_key`` may run at once, across all workers. With ``eager_polling``, a
    worker fetches again as soon as it has recorded finished jobs, instead of waiting for a
    notification or the next poll. See ``docs/limits.md``.
    """

    class State(enum.StrEnum):
        ACTIVE = "active"
        PAUSED = "paused"

    name: str
    concurrency: int | None = None
    tags: frozenset[str] = frozenset({".*"})
    state: Queue.State = State.ACTIVE
    executor: str = DEFAULT_EXECUTOR
    executor_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    polling_interval: float = 5
    rate_limit: int | None = None
    rate_limit_window: int | None = None
    resume_at: dt.datetime | None = None
    eager_polling: bool = False
    concurrency_key_limit: int = 1

    def __init__(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        tags: set[str] | frozenset[str] | list[str] | tuple[str, ...] | None = None,
        state: Queue.State | str = State.ACTIVE,
        executor: str | Any = DEFAULT_EXECUTOR,
        executor_options: Mapping[str, Any] | None = None,
        polling_interval: float = 5,
        rate_limit: int | None = None,
        rate_limit_window: int | None = None,
        resume_at: dt.datetime | None = None,
        eager_polling: bool = False,
        concurrency_key_limit: int = 1,
    ) -> None:
        validate_queue_name(name)
        if concurrency is not None and (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= _INT32_MAX
        ):
            raise QueueValidationError(f"concurrency must be a positive int, not {concurrency!r}")
        tag_set = frozenset({".*"} if tags is None else tags)
        for tag in tag_set:
            try:
                re.compile(tag)
            except (re.error, TypeError) as exc:
                raise QueueValidationError(f"invalid tag pattern {tag!r}: {exc}") from None
        try:
            queue_state = Queue.State(state)
        except ValueError:
            raise QueueValidationError(f"unknown queue state {state!r}") from None
        executor_path = _executor_path(executor)
        try:
            json.dumps(dict(executor_options or {}), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise QueueValidationError(f"executor_options must be JSON: {exc}") from None
        if not (isinstance(polling_interval, int | float) and 0 < polling_interval < float("inf")):
            raise QueueValidationError(
                "polling_interval must be a positive, finite number of seconds"
            )
        if (rate_limit is None) != (rate_limit_window is None):
            raise QueueValidationError("rate_limit and rate_limit_window go together")
        limits = (
            ("rate_limit", rate_limit),
            ("rate_limit_window", rate_limit_window),
            ("concurrency_key_limit", concurrency_key_limit),
        )
        for label, value in limits:
            if (value is not None or label == "concurrency_key_limit") and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= _INT32_MAX
            ):
                raise QueueValidationError(f"{label} must be an int from 1 to {_INT32_MAX}")
        if resume_at is not None and (
            not isinstance(resume_at, dt.datetime) or resume_at.utcoffset() is None
        ):
            raise QueueValidationError("resume_at must be a timezone-aware datetime")
        values: dict[str, Any] = {
            "name": name,
            "concurrency": concurrency,
            "tags": tag_set,
            "state": queue_state,
            "executor": executor_path,
            "executor_options": dict(executor_options or {}),
            "polling_interval": float(polling_interval),
            "rate_limit": rate_limit,
            "rate_limit_window": rate_limit_window,
            "resume_at": resume_at,
            "eager_polling": bool(eager_polling),
            "concurrency_key_limit": concurrency_key_limit,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def matches(self, worker_tags: set[str] | frozenset[str]) -> bool:
        """True if any of this queue's tag patterns fully matches any worker tag."""
        return any(re.fullmatch(pattern, tag) for pattern in self.tags for tag in worker_tags)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (for the CLI and dashboard)."""
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "tags": sorted(self.tags),
            "state": self.state.value,
            "executor": self.executor,
            "executor_options": dict(self.executor_options),
            "polling_interval": self.polling_interval,
            "rate_limit": self.rate_limit,
            "rate_limit_window": self.rate_limit_window,
            "resume_at": self.resume_at.isoformat() if self.resume_at else None,
            "eager_polling": self.eager_polling,
            "concurrency_key_limit": self.concurrency_key_limit,
        }


def _executor_path(executor: Any) -> str:
    value = getattr(executor, "value", executor)  # a Chancy.Executor member
    if isinstance(value, type):
        value = f"{value.__module__}.{value.__qualname__}"
    if not isinstance(value, str) or "." not in value:
        raise QueueValidationError(f"executor must be an import path or class, not {executor!r}")
    return value
