"""RetryPlugin: exponential back-off with jitter between attempts, per-queue defaults, and
which exceptions are worth retrying at all."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
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
    "retry_on": None,
    "never_retry_on": [],
}

ExceptionNames = Iterable[type[BaseException] | str]


def exception_name(exc: type[BaseException] | str) -> str:
    """The import path an exception class is matched by (``builtins.ValueError``); a
    string is taken as given (a bare class name matches any module's class of that name)."""
    if isinstance(exc, str):
        if not exc or exc.strip() != exc:
            raise ConfigurationError(f"not an exception name: {exc!r}")
        return exc
    if isinstance(exc, type) and issubclass(exc, BaseException):
        return f"{exc.__module__}.{exc.__qualname__}"
    raise ConfigurationError(f"retry_on/never_retry_on take exception classes, not {exc!r}")


def retry_settings(
    *,
    backoff: float | None = None,
    backoff_factor: float | None = None,
    backoff_limit: float | None = None,
    backoff_jitter: tuple[float, float] | list[float] | None = None,
    retry_on: ExceptionNames | None = None,
    never_retry_on: ExceptionNames | None = None,
) -> dict[str, Any]:
    """Validated, JSON-ready retry settings, for ``job.with_meta({"retry_settings": ...})``
    or :class:`RetryPlugin` queue defaults. Only the settings given are included."""
    settings: dict[str, Any] = {}
    if backoff is not None:
        settings["backoff"] = backoff
    if backoff_factor is not None:
        settings["backoff_factor"] = backoff_factor
    if backoff_limit is not None:
        settings["backoff_limit"] = backoff_limit
    if backoff_jitter is not None:
        settings["backoff_jitter"] = list(backoff_jitter)
    if retry_on is not None:
        settings["retry_on"] = [exception_name(e) for e in retry_on]
    if never_retry_on is not None:
        settings["never_retry_on"] = [exception_name(e) for e in never_retry_on]
    return _checked(settings)


def _checked(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ConfigurationError(f"unknown retry settings: {sorted(unknown)}")
    for key in ("backoff", "backoff_factor", "backoff_limit"):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{key} must be a number, not {value!r}")
            if not math.isfinite(value) or value < (1 if key == "backoff_factor" else 0):
                raise ConfigurationError(f"{key} out of range: {value!r}")
    if "backoff_jitter" in settings:
        jitter = settings["backoff_jitter"]
        if (
            not isinstance(jitter, list | tuple)
            or len(jitter) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in jitter)
            or not 0 <= jitter[0] <= jitter[1]
        ):
            raise ConfigurationError(f"backoff_jitter must be [min, max] seconds, not {jitter!r}")
    for key in ("retry_on", "never_retry_on"):
        names = settings.get(key)
        if names is not None and (
            not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigurationError(f"{key} must be a list of exception names")
    return dict(settings)


def _matches(raised: list[str], names: Iterable[str]) -> bool:
    """Whether an exception whose class and bases are ``raised`` (import paths) is one
    of ``names``."""
    bare = {path.rpartition(".")[2] for path in raised}
    return any(name in raised or ("." not in name and name in bare) for name in names)


class RetryPlugin(Plugin):
    """Delays a failed job's next attempt by ``backoff * backoff_factor ** (attempt - 1)``
    seconds, capped at ``backoff_limit``, plus a random jitter in ``backoff_jitter``
    (``[min, max]`` seconds), and decides whether it is retried at all: with ``retry_on``
    only those exceptions (and their subclasses) are retried, and ``never_retry_on``
    exceptions fail the job at once.

    Settings merge in this order, later winning: the plugin's own (keyword arguments),
    ``queue_defaults[job.queue]``, then the job's ``meta["retry_settings"]``. Build them
    with :func:`retry_settings`.
    """

    def __init__(
        self,
        *,
        queue_defaults: Mapping[str, Mapping[str, Any]] | None = None,
        **defaults: Any,
    ) -> None:
        self.defaults = {**DEFAULTS, **_checked(defaults)}
        self.queue_defaults = {
            name: _checked(settings) for name, settings in (queue_defaults or {}).items()
        }

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.retry"

    def settings_for(self, queue: str, job_settings: Any = None) -> dict[str, Any]:
        """The merged settings for a job of ``queue`` with its own ``retry_settings``."""
        merged = {**self.defaults, **self.queue_defaults.get(queue, {})}
        if isinstance(job_settings, Mapping):
            merged.update({k: v for k, v in job_settings.items() if k in DEFAULTS})
        return merged

    def delay_for(self, attempt: int, settings: Mapping[str, Any] | None = None) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        merged = {**self.defaults, **(settings or {})}
        exponent = max(attempt - 1, 0)
        limit = float(merged["backoff_limit"])
        factor = float(merged["backoff_factor"])
        try:
            base = float(merged["backoff"]) * factor**exponent
        except OverflowError:
            base = limit
        delay = min(base, limit)
        low, high = merged["backoff_jitter"]
        return delay + random.uniform(float(low), float(high))

    def should_retry(self, raised: list[str] | None, settings: Mapping[str, Any]) -> bool:
        """Whether an exception (class and bases as import paths) is worth retrying."""
        if raised is None:
            return True
        if _matches(raised, settings.get("never_retry_on") or ()):
            return False
        retry_on = settings.get("retry_on")
        return retry_on is None or _matches(raised, retry_on)

    async def on_job_completed(self, worker: Worker, outcome: Outcome) -> Outcome:
        if outcome.state != "retrying":
            return outcome
        settings = self.settings_for(outcome.job.queue, outcome.job.meta.get("retry_settings"))
        if not self.should_retry(outcome.exception, settings):
            outcome.state = "failed"
            return outcome
        outcome.delay = self.delay_for(outcome.job.attempts, settings)
        return outcome
