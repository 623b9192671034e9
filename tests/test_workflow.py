"""Workflows: validation, dependency order, failure propagation, event-driven progress,
fan-out at scale, fetching, paging and the DOT export — on a real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from chancy import Chancy, Job, Queue, Worker
from chancy.errors import (
    DuplicateStepError,
    UnknownDependencyError,
    UnknownQueueError,
    WorkflowCycleError,
    WorkflowValidationError,
)
from chancy.job import QueuedJob
from chancy.plugin import Plugin
from chancy.plugins.leadership import Leadership
from chancy.plugins.workflow import (
    STATE_COLOURS,
    Sequence,
    Workflow,
    WorkflowPlugin,
)
from chancy.store import arun
from chancy.store import workflow as workflow_store
from tests import jobs_workflow
from tests.test_worker import poll, serving

STEP = "tests.jobs_workflow.step"


def step(name: str, **fields: Any) -> Job:
    return Job(func=STEP, kwargs={"name": name}, **fields)


def fail(**fields: Any) -> Job:
    return Job(func="tests.jobs_workflow.fail", **fields)


@asynccontextmanager
async def app_with(
    dsn: str, polling_interval: float = 0.2, *, poll: bool = True, **options: Any
) -> AsyncIterator[Chancy]:
    """An app whose workers advance workflows; with ``poll=False`` no worker ever leads,
    so the leader's polling fallback never runs and only completion events count."""
    plugins: list[Plugin] = [WorkflowPlugin(polling_interval=polling_interval, **options)]
    if poll:
        plugins.append(Leadership(poll_interval=0.1, timeout=1))
    async with Chancy(dsn, plugins=plugins, no_default_plugins=not poll) as app:
        await app.migrate()
        await app.declare(Queue("default", executor=Chancy.Executor.Async, concurrency=20))
        yield app


async def jobs_by_step(app: Chancy, workflow: Workflow) -> dict[str, QueuedJob]:
    refs = {s.step_id: s.job_id for s in workflow.steps.values() if s.job_id is not None}
    found = {j.id: j for j in await app.get_jobs(refs.values())}
    return {step_id: found[ref] for step_id, ref in refs.items()}


def started_after(later: QueuedJob, earlier: QueuedJob) -> bool:
    # Claim time against completion time: the later job cannot be claimed before it is
    # pushed, which happens only once the earlier one's completion has committed.
    assert later.started_at is not None and earlier.completed_at is not None
    return later.started_at >= earlier.completed_at


async def run_to_end(app: Chancy, workflow: Workflow, timeout: float = 30) -> Workflow:
    workflow_id = await WorkflowPlugin.push(app, workflow)
    async with serving(app):
        done = await WorkflowPlugin.wait_for_workflow(
            app, workflow_id, interval=0.05, timeout=timeout
        )
    assert done is not None
    return done


async def test_sequence_runs_steps_in_order(dsn: str) -> None:
    async with app_with(dsn) as app:
        seq = Sequence("seq", [step("a"), step("b"), step("c")])
        workflow_id = await seq.push(app)
        assert isinstance(workflow_id, str)
        async with serving(app):
            done = await WorkflowPlugin.wait_for_workflow(app, workflow_id, timeout=30)
        assert done is not None and done.state == Workflow.State.COMPLETED
        assert done.id == workflow_id and done.name == "seq"
        assert [s.step_id for s in done.steps.values()] == ["0", "1", "2"]
        assert all(s.state == "succeeded" for s in done.steps.values())
        jobs = await jobs_by_step(app, done)
        assert [jobs[i].result for i in "012"] == ["a", "b", "c"]
        assert started_after(jobs["1"], jobs["0"]) and started_after(jobs["2"], jobs["1"])
        assert jobs["1"].meta["workflow"] == {"id": workflow_id, "step": "1"}


async def test_diamond_joins_after_both_branches(dsn: str) -> None:
    async with app_with(dsn) as app:
        wf = (
            Workflow("diamond")
            .add("top", step("top"))
            .add("left", step("left"), ["top"])
            .add("right", step("right"), ["top"])
            .add("bottom", step("bottom"), ["left", "right"])
        )
        done = await run_to_end(app, wf)
        assert done.state == Workflow.State.COMPLETED
        jobs = await jobs_by_step(app, done)
        assert started_after(jobs["left"], jobs["top"])
        assert started_after(jobs["right"], jobs["top"])
        assert started_after(jobs["bottom"], jobs["left"])
        assert started_after(jobs["bottom"], jobs["right"])
        # The join was pushed exactly once although two completions could trigger it.
        count = await count_jobs(app, "bottom")
        assert count == 1


async def count_jobs(app: Chancy, name: str) -> int:
    async with app.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM chancy_jobs WHERE kwargs->>'name' = %s", (name,)
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_group_fans_out_and_in(dsn: str) -> None:
    async with app_with(dsn) as app:
        wf = (
            Workflow("fan")
            .add("start", step("start"))
            .add_group("work", [step(f"w{i}") for i in range(5)], dependencies="start")
            .add_group("named", {"x": step("x"), "y": step("y")}, dependencies=["start"])
            .add("collect", step("collect"), ["work", "named"])
        )
        assert wf.validate()["collect"] == [f"work.{i}" for i in range(5)] + ["x", "y"]
        done = await run_to_end(app, wf)
        assert done.state == Workflow.State.COMPLETED
        assert done.groups == {"work": [f"work.{i}" for i in range(5)], "named": ["x", "y"]}
        assert done.steps["collect"].dependencies == [f"work.{i}" for i in range(5)] + ["x", "y"]
        jobs = await jobs_by_step(app, done)
        for member in [*done.groups["work"], "x", "y"]:
            assert started_after(jobs[member], jobs["start"])
            assert started_after(jobs["collect"], jobs[member])


async def test_failed_step_skips_dependents_and_fails_workflow(dsn: str) -> None:
    async with app_with(dsn) as app:
        wf = (
            Workflow("broken")
            .add("a", step("a"))
            .add("b", fail(max_attempts=2), ["a"])
            .add("c", step("c"), ["b"])
            .add("d", step("d"), ["c"])
            .add("other", step("other"), ["a"])
        )
        done = await run_to_end(app, wf)
        assert done.state == Workflow.State.FAILED
        states = {s.step_id: s.state.value for s in done.steps.values()}
        assert states == {
            "a": "succeeded",
            "b": "failed",
            "c": "skipped",
            "d": "skipped",
            "other": "succeeded",
        }
        assert done.steps["c"].job_id is None and done.steps["d"].job_id is None
        jobs = await jobs_by_step(app, done)
        assert jobs["b"].attempts == 2 and jobs["b"].state == QueuedJob.State.FAILED
        assert await count_jobs(app, "c") == 0


async def test_retries_within_a_step(dsn: str) -> None:
    key = uuid.uuid4().hex
    async with app_with(dsn) as app:
        flaky = Job(
            func="tests.jobs_workflow.flaky",
            kwargs={"key": key, "failures": 2},
            max_attempts=3,
        )
        wf = Workflow("retry").add("flaky", flaky).add("after", step("after"), ["flaky"])
        done = await run_to_end(app, wf)
        assert done.state == Workflow.State.COMPLETED
        jobs = await jobs_by_step(app, done)
        assert jobs["flaky"].attempts == 3 and jobs["flaky"].result == 3
        assert len(jobs["flaky"].errors) == 2
        assert jobs_workflow.ATTEMPTS[key] == 3


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: Workflow("w").add("a", step("a"), ["nope"]), UnknownDependencyError),
        (lambda: Workflow("w").add("a", step("a")).add("a", step("b")), DuplicateStepError),
        (
            lambda: Workflow("w").add("g", step("a")).add_group("g", [step("b")]),
            DuplicateStepError,
        ),
        (lambda: Workflow("w").add("a", step("a"), ["a"]), WorkflowCycleError),
        (
            lambda: (
                Workflow("w")
                .add("root", step("r"))
                .add("a", step("a"), ["root", "c"])
                .add("b", step("b"), ["a"])
                .add("c", step("c"), ["b"])
            ),
            WorkflowCycleError,
        ),
        (lambda: Workflow("empty"), WorkflowValidationError),
    ],
)
async def test_invalid_graphs_are_refused_and_nothing_is_stored(
    chancy: Chancy, build: Any, error: type[Exception]
) -> None:
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    with pytest.raises(error) as raised:
        await WorkflowPlugin.push(chancy, build())
    assert isinstance(raised.value, WorkflowValidationError)
    assert await WorkflowPlugin.fetch_workflows(chancy) == []
    assert await count_all_jobs(chancy) == 0


async def count_all_jobs(app: Chancy) -> int:
    async with app.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM chancy_jobs")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_cycle_error_names_the_steps(chancy: Chancy) -> None:
    wf = Workflow("w").add("x", step("x"), ["y"]).add("y", step("y"), ["x"])
    with pytest.raises(WorkflowCycleError, match="'x', 'y'"):
        await WorkflowPlugin.push(chancy, wf)


async def test_unknown_queue_is_refused_and_nothing_is_stored(chancy: Chancy) -> None:
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    wf = Workflow("w").add("a", step("a")).add("b", step("b", queue="nowhere"), ["a"])
    with pytest.raises(UnknownQueueError, match="nowhere"):
        await WorkflowPlugin.push(chancy, wf)
    assert await WorkflowPlugin.fetch_workflows(chancy) == []
    assert await count_all_jobs(chancy) == 0


def test_bad_steps_fail_when_added() -> None:
    with pytest.raises(WorkflowValidationError):
        Workflow("w").add("", step("a"))
    with pytest.raises(WorkflowValidationError):
        Workflow("w").add("a", "tests.jobs_workflow.step")  # type: ignore[arg-type]
    with pytest.raises(WorkflowValidationError):
        Workflow("w").add("a", step("a"), [1])  # type: ignore[list-item]
    with pytest.raises(WorkflowValidationError):
        Workflow("w").add_group("g", [])
    with pytest.raises(WorkflowValidationError):
        Workflow("")


async def test_bad_lookup_arguments(chancy: Chancy) -> None:
    with pytest.raises(WorkflowValidationError):
        await WorkflowPlugin.fetch_workflow(chancy, "not-a-uuid")
    with pytest.raises(WorkflowValidationError):
        await WorkflowPlugin.fetch_workflows(chancy, states=["done"])
    with pytest.raises(WorkflowValidationError):
        await WorkflowPlugin.fetch_workflows(chancy, limit=0)


async def test_wait_for_workflow_times_out_and_knows_missing_ones(chancy: Chancy) -> None:
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    workflow_id = await WorkflowPlugin.push(chancy, Sequence("idle", [step("a")]))
    with pytest.raises(TimeoutError):
        await WorkflowPlugin.wait_for_workflow(chancy, workflow_id, interval=0.05, timeout=0.3)
    assert await WorkflowPlugin.wait_for_workflow(chancy, uuid.uuid4(), timeout=1) is None
    pending = await WorkflowPlugin.fetch_workflow(chancy, workflow_id)
    assert pending is not None and pending.state == Workflow.State.PENDING
    assert pending.steps["0"].state == "running" and pending.steps["0"].job_state == "pending"


async def test_fetch_workflows_pages_newest_first_and_filters(dsn: str) -> None:
    async with app_with(dsn) as app:
        ids = [await WorkflowPlugin.push(app, Sequence(f"w{i}", [step("x")])) for i in range(5)]
        newest_first = list(reversed(ids))
        seen: list[str] = []
        before: str | None = None
        while True:
            page = await WorkflowPlugin.fetch_workflows(app, limit=2, before=before)
            if not page:
                break
            assert len(page) <= 2
            seen += [w.id for w in page if w.id is not None]
            before = page[-1].id
        assert seen == newest_first
        assert await WorkflowPlugin.fetch_workflows(app, states=["completed"]) == []
        async with serving(app):
            await WorkflowPlugin.wait_for_workflow(app, ids[2], interval=0.05, timeout=30)
            for workflow_id in ids:
                await WorkflowPlugin.wait_for_workflow(app, workflow_id, timeout=30)
        completed = await WorkflowPlugin.fetch_workflows(app, states=[Workflow.State.COMPLETED])
        assert [w.id for w in completed] == newest_first
        assert all(w.steps["0"].state == "succeeded" for w in completed)
        assert await WorkflowPlugin.fetch_workflows(app, states=["pending", "running"]) == []


async def test_dot_export_colours_steps_by_state(dsn: str) -> None:
    async with app_with(dsn) as app:
        wf = (
            Workflow('say "hi"')
            .add("a", step("a"))
            .add("b", fail(), ["a"])
            .add("c", step("c"), ["b"])
        )
        before = wf.to_dot()
        assert before.startswith('digraph "say \\"hi\\"" {')
        assert before.count(STATE_COLOURS["pending"]) == 3
        done = await run_to_end(app, wf)
        dot = done.to_dot()
        assert dot == WorkflowPlugin.generate_dot(done)
        assert '"a" -> "b";' in dot and '"b" -> "c";' in dot
        nodes = [line for line in dot.splitlines() if " [label" in line]
        lines = {line.split(" [")[0].strip(): line for line in nodes}
        assert STATE_COLOURS["succeeded"] in lines['"a"']
        assert STATE_COLOURS["failed"] in lines['"b"']
        assert STATE_COLOURS["skipped"] in lines['"c"'] and "dashed" in lines['"c"']
        assert "(failed)" in dot


async def test_a_thousand_step_fan_out(dsn: str) -> None:
    async with app_with(dsn) as app:
        width = 1000
        wf = (
            Workflow("wide")
            .add_group("work", [Job(func="tests.jobs_workflow.noop") for _ in range(width)])
            .add("collect", step("collect"), ["work"])
        )
        # Pushing (which starts all 1,000 ready steps) is a handful of statements.
        statements = await count_statements(
            app,
            workflow_store.push_workflow(
                app.store,
                uuid.uuid4(),
                "counted",
                [
                    workflow_store.StepSpec(s.step_id, s.group_id, s.job, deps)
                    for s, deps in zip(wf.steps.values(), wf.validate().values(), strict=True)
                ],
                require_queues=True,
                notify=False,
            ),
        )
        assert statements <= 10
        workflow_id = await WorkflowPlugin.push(app, wf)
        async with serving(app, worker_id="one"), serving(app, worker_id="two"):
            done = await WorkflowPlugin.wait_for_workflow(
                app, workflow_id, interval=0.1, timeout=120
            )
        assert done is not None and done.state == Workflow.State.COMPLETED
        assert sum(s.state == "succeeded" for s in done.steps.values()) == width + 1
        assert await count_jobs(app, "collect") == 1


async def count_statements(app: Chancy, op: Generator[Any, Any, Any]) -> int:
    count = 0

    def counting() -> Generator[Any, Any, Any]:
        nonlocal count
        rows = None
        try:
            statement = next(op)
            while True:
                count += 1
                rows = yield statement
                statement = op.send(rows)
        except StopIteration as stop:
            return stop.value

    async with app.connection() as conn, conn.transaction(force_rollback=True):
        await arun(conn, counting())
    return count


async def test_dependent_starts_on_completion_not_on_the_poll(dsn: str) -> None:
    # No worker leads, so nothing polls: only the completion event can start the next step.
    async with app_with(dsn, polling_interval=3600, poll=False) as app:
        async with serving(app) as worker:
            assert not worker.is_leader.is_set()
            workflow_id = await Sequence("quick", [step("a"), step("b"), step("c")]).push(app)
            done = await WorkflowPlugin.wait_for_workflow(
                app, workflow_id, interval=0.05, timeout=30
            )
        assert done is not None and done.state == Workflow.State.COMPLETED


async def test_poll_notices_a_step_cancelled_outside_a_worker(dsn: str) -> None:
    async with app_with(dsn) as app:
        wf = Workflow("cancelled").add("a", step("a")).add("b", step("b"), ["a"])
        workflow_id = await WorkflowPlugin.push(app, wf)
        stored = await WorkflowPlugin.fetch_workflow(app, workflow_id)
        assert stored is not None and stored.steps["a"].job_id is not None
        assert await app.cancel_job(stored.steps["a"].job_id)
        async with serving(app):
            done = await WorkflowPlugin.wait_for_workflow(
                app, workflow_id, interval=0.05, timeout=30
            )
        assert done is not None and done.state == Workflow.State.FAILED
        assert done.steps["a"].state == "cancelled" and done.steps["b"].state == "skipped"


async def test_advance_without_a_worker(chancy: Chancy) -> None:
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    wf = Workflow("manual").add("a", step("a")).add("b", step("b"), ["a"])
    workflow_id = await WorkflowPlugin.push(chancy, wf)
    assert await WorkflowPlugin.advance(chancy) == 0
    stored = await WorkflowPlugin.fetch_workflow(chancy, workflow_id)
    assert stored is not None and stored.steps["a"].job_id is not None
    # Finish step a by hand, as another worker would, and let the poll path see it.
    async with chancy.connection() as conn:
        await conn.execute(
            "UPDATE chancy_jobs SET state = 'succeeded', completed_at = now() WHERE id = %s",
            (stored.steps["a"].job_id.uuid,),
        )
    assert await WorkflowPlugin.advance(chancy) == 1
    assert await WorkflowPlugin.advance(chancy, [workflow_id]) == 0
    after = await WorkflowPlugin.fetch_workflow(chancy, workflow_id)
    assert after is not None and after.state == Workflow.State.RUNNING
    assert after.steps["a"].state == "succeeded" and after.steps["b"].state == "running"


async def test_default_plugin_and_migrations_down_and_up(chancy: Chancy) -> None:
    assert isinstance(chancy.plugins["chancy.workflow"], WorkflowPlugin)
    package = "chancy.migrations.workflow"
    async with chancy.connection() as conn, conn.transaction():
        assert await arun(conn, chancy.store.migrate("chancy.workflow", package, 0)) == [-1]
    assert not await chancy.is_up_to_date()
    await chancy.migrate()
    assert await chancy.is_up_to_date()
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    assert await WorkflowPlugin.push(chancy, Sequence("again", [step("a")]))


def test_plugin_settings_are_validated() -> None:
    from chancy.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        WorkflowPlugin(polling_interval=0)
    with pytest.raises(ConfigurationError):
        WorkflowPlugin(retention=-1)


async def test_leader_deletes_finished_workflows_after_retention(dsn: str) -> None:
    async with app_with(dsn, polling_interval=0.1, retention=0.5) as app:
        await app.declare(Queue("parked", executor=Chancy.Executor.Async))
        await app.pause_queue("parked")
        live_id = await Sequence("live", [step("x", queue="parked")]).push(app)
        done_id = await Sequence("done", [step("y")]).push(app)
        async with serving(app):
            await WorkflowPlugin.wait_for_workflow(app, done_id, interval=0.05, timeout=30)
            await poll(lambda: is_gone(app, done_id))
        assert await WorkflowPlugin.fetch_workflow(app, live_id) is not None
        async with app.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM chancy_workflow_steps")
            row = await cur.fetchone()
        assert row is not None and row[0] == 1


async def is_gone(app: Chancy, workflow_id: str) -> bool:
    return await WorkflowPlugin.fetch_workflow(app, workflow_id) is None


async def test_worker_runs_without_the_plugin(dsn: str) -> None:
    # Workflows pushed while no worker has the plugin still advance once one does.
    async with Chancy(dsn, no_default_plugins=True) as bare:
        await bare.migrate()
        await bare.declare(Queue("default", executor=Chancy.Executor.Async))
    async with app_with(dsn) as app:
        workflow_id = await Sequence("later", [step("a"), step("b")]).push(app)
    async with Chancy(dsn, no_default_plugins=True) as bare:
        async with Worker(bare, register_signal_handlers=False):
            await poll(lambda: first_step_done(bare, workflow_id))
    async with app_with(dsn) as app:
        async with serving(app):
            done = await WorkflowPlugin.wait_for_workflow(app, workflow_id, timeout=30)
        assert done is not None and done.state == Workflow.State.COMPLETED


async def first_step_done(app: Chancy, workflow_id: str) -> bool:
    workflow = await WorkflowPlugin.fetch_workflow(app, workflow_id)
    assert workflow is not None
    job_id = workflow.steps["0"].job_id
    job = await app.get_job(job_id) if job_id is not None else None
    return job is not None and job.state == QueuedJob.State.SUCCEEDED


async def test_workflow_is_running_once_its_first_job_starts(dsn: str) -> None:
    key = uuid.uuid4().hex
    gate = jobs_workflow.GATES.setdefault(key, threading.Event())
    async with app_with(dsn, polling_interval=3600, poll=False) as app:
        blocker = Job(func="tests.jobs_workflow.gate", kwargs={"key": key})
        workflow_id = await Sequence("gated", [blocker, step("after")]).push(app)
        try:
            async with serving(app):
                await poll(lambda: workflow_state(app, workflow_id, "running"))
                current = await WorkflowPlugin.fetch_workflow(app, workflow_id)
                assert current is not None and current.steps["0"].job_state == "running"
                assert current.steps["1"].state == "pending"
                gate.set()
                done = await WorkflowPlugin.wait_for_workflow(app, workflow_id, timeout=30)
        finally:
            gate.set()
        assert done is not None and done.state == Workflow.State.COMPLETED


async def workflow_state(app: Chancy, workflow_id: str, state: str) -> bool:
    workflow = await WorkflowPlugin.fetch_workflow(app, workflow_id)
    return workflow is not None and workflow.state == state


async def test_push_ex_joins_the_callers_transaction(chancy: Chancy) -> None:
    await chancy.declare(Queue("default", executor=Chancy.Executor.Async))
    wf = Workflow("txn").add("a", step("a")).add("b", step("b"), ["a"])
    async with chancy.connection() as conn:
        async with conn.transaction(force_rollback=True):
            rolled_back = await WorkflowPlugin.push_ex(chancy, conn, wf)
            assert await WorkflowPlugin.fetch_workflow(chancy, rolled_back) is None
        assert await WorkflowPlugin.fetch_workflows(chancy) == []
        assert await count_all_jobs(chancy) == 0
        async with conn.transaction():
            with pytest.raises(UnknownQueueError):
                await WorkflowPlugin.push_ex(chancy, conn, Sequence("x", [step("x", queue="q")]))
            committed = await WorkflowPlugin.push_ex(chancy, conn, wf)
    stored = await WorkflowPlugin.fetch_workflow(chancy, committed)
    assert stored is not None and stored.steps["a"].state == "running"
    assert await count_all_jobs(chancy) == 1
