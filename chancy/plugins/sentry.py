"""SentryPlugin: report failed and retried jobs to Sentry (``pip install chancy[sentry]``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from chancy.errors import ConfigurationError
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.store import Outcome
    from chancy.worker import Worker

_FRAME_RE = re.compile(r'^  File "(?P<filename>[^"]*)", line (?P<lineno>\d+), in (?P<function>.*)$')
_NAME_RE = re.compile(r"^[A-Za-z_][\w.]*$")
_HEADER = "Traceback (most recent call last):"


def _sentry_sdk() -> Any:
    try:
        import sentry_sdk
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError("needs sentry-sdk: pip install 'chancy[sentry]'") from None
    return sentry_sdk


def exception_from_traceback(text: str) -> dict[str, Any]:
    """A Sentry exception entry (type, value, module, frames) parsed from a formatted
    Python traceback; for chained exceptions, the last one raised. Executors report a
    job's error as text (it may come from another process), not as an exception object."""
    lines = text.rstrip().splitlines()
    headers = [i for i, line in enumerate(lines) if line == _HEADER]
    start = headers[-1] + 1 if headers else len(lines)
    frames: list[dict[str, Any]] = []
    message_at = start
    for index in range(start, len(lines)):
        line = lines[index]
        match = _FRAME_RE.match(line)
        if match:
            frames.append(
                {
                    "filename": match["filename"],
                    "abs_path": match["filename"],
                    "lineno": int(match["lineno"]),
                    "function": match["function"],
                    "in_app": "/site-packages/" not in match["filename"],
                }
            )
        elif not line.startswith(" "):
            message_at = index
            break
        elif frames and "context_line" not in frames[-1] and set(line.strip()) - set("^~ "):
            frames[-1]["context_line"] = line.strip()
    else:
        message_at = len(lines)
    message = "\n".join(lines[message_at:] if headers else lines).strip()
    name, separator, value = message.partition(": ")
    if not separator or not _NAME_RE.match(name):
        name, value = "JobError", message
    module, _, short = name.rpartition(".")
    entry: dict[str, Any] = {
        "type": short,
        "value": value,
        "mechanism": {"type": "chancy", "handled": False},
    }
    if module:
        entry["module"] = module
    if frames:
        entry["stacktrace"] = {"frames": frames}
    return entry


class SentryPlugin(Plugin):
    """Captures a Sentry event when a job fails (level ``error``) or will be retried
    (level ``warning``; off with ``capture_retries=False``), tagged with the job's id,
    queue, function, attempt and state.

    Pass a ``dsn`` (and any other ``sentry_sdk.init`` options) to initialise Sentry here,
    or leave it None when the application has initialised Sentry already. Job kwargs are
    not sent (they may hold personal data).
    """

    def __init__(
        self, dsn: str | None = None, *, capture_retries: bool = True, **options: Any
    ) -> None:
        sentry_sdk = _sentry_sdk()
        if dsn is not None:
            sentry_sdk.init(dsn=dsn, **options)
        elif options:
            raise ConfigurationError("sentry_sdk.init options need a dsn")
        self.capture_retries = capture_retries

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.sentry"

    async def on_job_completed(self, worker: Worker, outcome: Outcome) -> Outcome:
        if outcome.error and (
            outcome.state == "failed" or (outcome.state == "retrying" and self.capture_retries)
        ):
            self.capture(worker, outcome)
        return outcome

    def capture(self, worker: Worker, outcome: Outcome) -> str | None:
        """Send one event for ``outcome``; returns the event id (None if not sent)."""
        job = outcome.job
        tags = {
            "chancy.job_id": str(job.id),
            "chancy.queue": job.queue,
            "chancy.func": job.func,
            "chancy.attempt": str(job.attempts),
            "chancy.state": outcome.state,
            "chancy.worker": worker.worker_id,
        }
        event: dict[str, Any] = {
            "level": "error" if outcome.state == "failed" else "warning",
            "logger": "chancy",
            "transaction": job.func,
            "exception": {"values": [exception_from_traceback(outcome.error or "")]},
            "contexts": {
                "chancy job": {
                    "id": str(job.id),
                    "queue": job.queue,
                    "func": job.func,
                    "attempt": job.attempts,
                    "max_attempts": job.max_attempts,
                    "priority": job.priority,
                    "unique_key": job.unique_key,
                    "state": outcome.state,
                    "retry_in_seconds": outcome.delay if outcome.state == "retrying" else None,
                }
            },
            "extra": {"traceback": outcome.error},
        }
        event_id: str | None = _sentry_sdk().capture_event(event, tags=tags)
        return event_id
