"""OpenTelemetry tracing (``pip install chancy[otel]``).

:class:`OpenTelemetryPlugin` opens a PRODUCER span when a job is pushed and a CONSUMER span
for each execution. The push injects the W3C trace context (``traceparent``) into the job's
``meta["otel"]``, and the execution span continues that trace, so the work of a job shows
up under the request that pushed it. Attributes follow the OpenTelemetry messaging
semantic conventions::

    chancy = Chancy(dsn, plugins=[OpenTelemetryPlugin()])

The push span ends when the job is handed to the database layer: a job's id is made at
insert time, so only the execution span carries ``messaging.message.id``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from chancy import __version__
from chancy.job import Job, QueuedJob, Reference
from chancy.plugin import Plugin

if TYPE_CHECKING:
    from chancy.store import Outcome
    from chancy.worker import Worker

__all__ = ["META_KEY", "OpenTelemetryPlugin"]

#: The key of ``Job.meta`` that carries the trace context of the push.
META_KEY = "otel"


class OpenTelemetryPlugin(Plugin):
    """Trace pushes (PRODUCER spans) and executions (CONSUMER spans).

    ``tracer_provider`` defaults to the global one. With ``link=True`` the execution span
    starts a new trace linked to the push instead of continuing its trace.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        link: bool = False,
    ) -> None:
        self.tracer = trace.get_tracer("chancy", __version__, tracer_provider=tracer_provider)
        self.link = link
        self._spans: dict[tuple[Reference, int], trace.Span] = {}

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.contrib.otel"

    # -- push side --------------------------------------------------------------------

    def on_job_pushing(self, job: Job) -> Job:
        attributes = _attributes(job, "create")
        with self.tracer.start_as_current_span(
            f"create {job.queue}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        return job.with_meta({**job.meta, META_KEY: carrier})

    # -- worker side ------------------------------------------------------------------

    async def on_job_starting(self, worker: Worker, job: QueuedJob) -> QueuedJob:
        carrier = job.meta.get(META_KEY) if job.meta else None
        parent = propagate.extract(carrier) if isinstance(carrier, dict) else None
        links: list[Link] = []
        if self.link and parent is not None:
            pushed = trace.get_current_span(parent).get_span_context()
            if pushed.is_valid:
                links.append(Link(pushed))
            parent = otel_context.Context()
        attributes = _attributes(job, "process")
        attributes["messaging.message.id"] = str(job.id)
        attributes["chancy.job.attempt"] = job.attempts
        attributes["chancy.worker.id"] = worker.worker_id
        span = self.tracer.start_span(
            f"process {job.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        self._spans[(job.id, job.attempts)] = span
        return job

    async def on_job_completed(self, worker: Worker, outcome: Outcome) -> Outcome:
        span = self._spans.pop((outcome.job.id, outcome.job.attempts), None)
        if span is not None:
            span.set_attribute("chancy.job.state", outcome.state)
            if outcome.error and outcome.state in ("retrying", "failed"):
                span.set_status(Status(StatusCode.ERROR, _last_line(outcome.error)))
                span.set_attribute("error.type", _error_type(outcome.error))
            span.end()
        return outcome

    async def cleanup(self, worker: Worker) -> None:
        for span in self._spans.values():
            span.set_attribute("chancy.job.state", "unknown")
            span.end()
        self._spans.clear()


def _attributes(job: Job, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": "chancy",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": job.queue,
        "chancy.job.func": job.func,
        "chancy.job.priority": job.priority,
        "chancy.job.max_attempts": job.max_attempts,
    }


def _last_line(error: str) -> str:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error


def _error_type(error: str) -> str:
    """The exception class named on the traceback's last line (``module.Name: message``)."""
    head = _last_line(error).split(":", 1)[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() else "_OTHER"
