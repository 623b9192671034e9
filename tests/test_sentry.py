"""SentryPlugin: failed and retried jobs become Sentry events, caught by a transport
that keeps envelopes in memory (no network)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from chancy import Chancy, Job, Queue
from chancy.errors import ConfigurationError
from chancy.plugins.sentry import SentryPlugin, exception_from_traceback
from tests.test_worker import serving

QUIET: dict[str, Any] = {"default_integrations": False, "auto_enabling_integrations": False}


class CollectingTransport(Transport):
    """Keeps every envelope instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        found: list[Any] = [e.get_event() for e in self.envelopes]
        return [e for e in found if e is not None]


@pytest.fixture
def transport() -> Iterator[CollectingTransport]:
    collector = CollectingTransport()
    yield collector
    sentry_sdk.get_client().close()
    sentry_sdk.init(**QUIET)  # no DSN: Sentry is off again for the other tests


@pytest.mark.parametrize("executor", [Chancy.Executor.Async, Chancy.Executor.Process])
async def test_failed_and_retried_jobs_are_captured_with_tags(
    dsn: str, transport: CollectingTransport, executor: str
) -> None:
    sentry_sdk.init(dsn="https://public@sentry.invalid/1", transport=transport, **QUIET)
    async with Chancy(dsn, plugins=[SentryPlugin()]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=executor))
        async with serving(app, worker_id="w-sentry"):
            bad = await app.push(Job(func="tests.jobs.fail", queue="q", max_attempts=2))
            good = await app.push(Job(func="tests.jobs.noop", queue="q"))
            for ref in (bad, good):
                await app.wait_for_job(ref, timeout=30)
    sentry_sdk.flush()
    events = transport.events()
    assert [e["level"] for e in events] == ["warning", "error"]
    for attempt, event in enumerate(events, start=1):
        assert event["tags"] == {
            "chancy.job_id": str(bad),
            "chancy.queue": "q",
            "chancy.func": "tests.jobs.fail",
            "chancy.attempt": str(attempt),
            "chancy.state": "retrying" if attempt == 1 else "failed",
            "chancy.worker": "w-sentry",
        }
        [exception] = event["exception"]["values"]
        assert exception["type"] == "ValueError" and exception["value"] == "boom"
        frames = exception["stacktrace"]["frames"]
        assert frames[-1]["function"] == "fail" and frames[-1]["filename"].endswith("jobs.py")
        assert frames[-1]["context_line"] == "raise ValueError(message)"
        assert event["contexts"]["chancy job"]["max_attempts"] == 2


async def test_retries_can_be_left_out_and_dsn_initialises_sentry(
    dsn: str, transport: CollectingTransport
) -> None:
    plugin = SentryPlugin(
        "https://public@sentry.invalid/2", capture_retries=False, transport=transport, **QUIET
    )
    assert sentry_sdk.get_client().dsn == "https://public@sentry.invalid/2"
    async with Chancy(dsn, plugins=[plugin]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=Chancy.Executor.Async))
        async with serving(app):
            ref = await app.push(Job(func="tests.jobs.fail", queue="q", max_attempts=3))
            await app.wait_for_job(ref, timeout=30)
    sentry_sdk.flush()
    assert [e["level"] for e in transport.events()] == ["error"]


def test_options_without_a_dsn_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        SentryPlugin(environment="prod")


def _raise_chained() -> None:
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as exc:
        raise RuntimeError("wrapped\nsecond line") from exc


def test_tracebacks_become_sentry_exceptions() -> None:
    try:
        _raise_chained()
    except RuntimeError:
        text = traceback.format_exc()
    entry = exception_from_traceback(text)
    # The last exception of the chain, with its own frames and its multi-line message.
    assert entry["type"] == "RuntimeError" and entry["value"] == "wrapped\nsecond line"
    frames = entry["stacktrace"]["frames"]
    assert [f["function"] for f in frames] == [
        "test_tracebacks_become_sentry_exceptions",
        "_raise_chained",
    ]
    assert frames[-1]["context_line"].startswith("raise RuntimeError")
    assert exception_from_traceback("chancy.errors.WorkerDiedError: worker w died") == {
        "type": "WorkerDiedError",
        "module": "chancy.errors",
        "value": "worker w died",
        "mechanism": {"type": "chancy", "handled": False},
    }
    assert exception_from_traceback("worker shut down")["type"] == "JobError"
