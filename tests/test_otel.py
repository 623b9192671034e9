"""OpenTelemetry: a PRODUCER span per push, a CONSUMER span per execution that continues
(or links to) the pushing trace, with messaging attributes."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chancy import Chancy, Job, Queue
from chancy.contrib.otel import META_KEY, OpenTelemetryPlugin
from tests.test_worker import serving


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_execution_span_continues_the_pushing_request(
    dsn: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    async with Chancy(dsn, plugins=[OpenTelemetryPlugin(tracer_provider=provider)]) as app:
        await app.migrate()
        await app.declare(Queue("eco", executor=Chancy.Executor.Async))
        with tracer.start_as_current_span("request") as request:
            ref = await app.push(
                Job(func="tests.jobs_eco.record", queue="eco", kwargs={"value": 1}, meta={"a": 1})
            )
        failing = await app.push(
            Job(func="tests.jobs_eco.flaky", queue="eco", kwargs={"fail_times": 9})
        )
        stored = await app.get_job(ref)
        assert stored is not None and stored.meta["a"] == 1
        assert stored.meta[META_KEY]["traceparent"].startswith("00-")
        async with serving(app):
            await app.wait_for_jobs([ref, failing], timeout=30)
    spans = exporter.get_finished_spans()
    [create, _other_create] = by_name(spans, "create eco")
    process = [
        s for s in by_name(spans, "process eco") if s.attributes["messaging.message.id"] == str(ref)
    ]
    [process] = process
    assert create.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert create.parent is not None and create.parent.span_id == request.get_span_context().span_id
    assert process.context.trace_id == request.get_span_context().trace_id
    assert process.parent is not None and process.parent.span_id == create.context.span_id
    assert create.attributes["messaging.system"] == "chancy"
    assert create.attributes["messaging.destination.name"] == "eco"
    assert create.attributes["messaging.operation.type"] == "create"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["chancy.job.attempt"] == 1
    assert process.attributes["chancy.job.func"] == "tests.jobs_eco.record"
    assert process.attributes["chancy.job.state"] == "succeeded"
    assert process.status.status_code is StatusCode.UNSET
    [failed] = [s for s in by_name(spans, "process eco") if s is not process]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError"
    assert failed.attributes["chancy.job.state"] == "failed"
    # The failing job was pushed outside the request: a trace of its own.
    assert failed.context.trace_id != request.get_span_context().trace_id


async def test_link_mode_and_bulk_and_transactional_pushes_carry_context(
    dsn: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    plugin = OpenTelemetryPlugin(tracer_provider=provider, link=True)
    async with Chancy(dsn, plugins=[plugin]) as app:
        await app.migrate()
        await app.declare(Queue("eco", executor=Chancy.Executor.Async))
        jobs = [Job(func="tests.jobs_eco.record", queue="eco", kwargs={"value": n}) for n in (1, 2)]
        refs = [ref async for batch in app.push_many(jobs) for ref in batch]
        async with app.connection() as conn, conn.transaction():
            refs.append(await app.push_ex(conn, jobs[0]))
        stored = await app.get_jobs(refs)
        assert all(META_KEY in job.meta for job in stored)
        async with serving(app):
            await app.wait_for_jobs(refs, timeout=30)
    spans = exporter.get_finished_spans()
    creates = by_name(spans, "create eco")
    processes = by_name(spans, "process eco")
    assert len(creates) == 3 and len(processes) == 3
    create_ids = {span.context.span_id for span in creates}
    for span in processes:
        assert span.parent is None
        [link] = span.links
        assert link.context.span_id in create_ids
