"""Workflows: jobs that start when the jobs they depend on have succeeded.

A :class:`Workflow` is a named graph of steps, each a :class:`~chancy.job.Job` with the ids
of the steps it depends on. :meth:`WorkflowPlugin.push` validates the graph, stores it and
pushes the steps without dependencies, all in one transaction. Each step's job carries
``meta["workflow"] = {"id": ..., "step": ...}``; when a worker records that a step's job
finished, it advances the workflow at once (pushing the steps that became ready), and the
leader polls every ``polling_interval`` seconds for progress made elsewhere (a job
finished on a worker without this plugin, a cancelled pending job). Any worker may advance
any workflow: row locks, not leadership, keep it correct.

States. A workflow is ``pending`` until one of its steps' jobs has started, then
``running``; it is ``completed`` when every step succeeded, and ``failed`` when no step can
run any more and at least one did not succeed. A step is ``pending`` (waiting for its
dependencies), ``running`` (its job was pushed; the job may still be queued or retrying),
then ``succeeded``, ``failed`` or ``cancelled`` like its job after its last attempt. Steps
that depend, directly or not, on a step that did not succeed are ``skipped``: they never
run. Steps on other branches keep running, and the workflow is marked ``failed`` once they
are done.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import time
import uuid
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING, Any

from chancy.errors import (
    ConfigurationError,
    DuplicateStepError,
    UnknownDependencyError,
    UnknownQueueError,
    WorkflowCycleError,
    WorkflowValidationError,
)
from chancy.job import FINISHED_STATES, Job, JobFunction, QueuedJob, Reference, uuid7
from chancy.plugin import Plugin
from chancy.store import Op, Row, arun
from chancy.store import workflow as workflow_store

if TYPE_CHECKING:
    from typing import Self

    import psycopg

    from chancy.app import Chancy
    from chancy.store import Outcome
    from chancy.worker import Worker

__all__ = ["Sequence", "Workflow", "WorkflowPlugin", "WorkflowStep"]

_MAX_ID = 255
WorkflowId = str | uuid.UUID


class StepState(enum.StrEnum):
    """The state of one step of a workflow."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class WorkflowState(enum.StrEnum):
    """The state of a workflow."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


#: Fill colours of the DOT export, by step state.
STATE_COLOURS: dict[str, str] = {
    StepState.PENDING: "#e0e0e0",
    StepState.RUNNING: "#9ecae1",
    StepState.SUCCEEDED: "#a1d99b",
    StepState.FAILED: "#fc9272",
    StepState.CANCELLED: "#fdae6b",
    StepState.SKIPPED: "#f5f5f5",
}


class WorkflowStep:
    """One step: its job template, the steps it waits for and, once stored, its progress
    (``state``, the ``job_id`` it was pushed as and that job's live ``job_state``)."""

    def __init__(
        self,
        step_id: str,
        job: Job,
        dependencies: Iterable[str] = (),
        *,
        group_id: str | None = None,
        state: StepState | str = StepState.PENDING,
        job_id: Reference | None = None,
        job_state: str | None = None,
        started_at: dt.datetime | None = None,
        completed_at: dt.datetime | None = None,
    ) -> None:
        self.step_id = step_id
        self.job = job
        self.dependencies = list(dependencies)
        self.group_id = group_id
        self.state = StepState(state)
        self.job_id = job_id
        self.job_state = job_state
        self.started_at = started_at
        self.completed_at = completed_at

    def __repr__(self) -> str:
        return f"WorkflowStep({self.step_id!r}, {self.job.func!r}, state={self.state.value!r})"


class Workflow:
    """A named graph of steps. Build it with the chainable :meth:`add` and
    :meth:`add_group`, then push it with :meth:`WorkflowPlugin.push`. Dependencies may name
    steps added later; the graph is checked as a whole when it is pushed."""

    State = WorkflowState
    StepState = StepState

    def __init__(self, name: str) -> None:
        _check_id(name, "workflow name")
        self.name = name
        self.id: str | None = None
        self.state = WorkflowState.PENDING
        self.created_at: dt.datetime | None = None
        self.updated_at: dt.datetime | None = None
        self.completed_at: dt.datetime | None = None
        self._steps: list[WorkflowStep] = []
        self.groups: dict[str, list[str]] = {}

    @property
    def steps(self) -> dict[str, WorkflowStep]:
        """The steps by id, in the order they were added."""
        steps: dict[str, WorkflowStep] = {}
        for step in self._steps:
            steps.setdefault(step.step_id, step)
        return steps

    def add(
        self,
        step_id: str,
        job: Job | JobFunction[Any, Any],
        dependencies: Iterable[str] | str | None = None,
    ) -> Self:
        """Add a step that runs ``job`` once every step (or group) in ``dependencies`` has
        succeeded. Returns the workflow, so calls chain."""
        _check_id(step_id, "step id")
        self._steps.append(WorkflowStep(step_id, _as_job(job), _as_ids(dependencies)))
        return self

    def add_group(
        self,
        group_id: str,
        jobs: SequenceABC[Job | JobFunction[Any, Any]] | Mapping[str, Job | JobFunction[Any, Any]],
        dependencies: Iterable[str] | str | None = None,
    ) -> Self:
        """Add steps that run in parallel once ``dependencies`` have succeeded. A mapping
        gives the step ids; a sequence gets ids ``"<group_id>.<index>"``. Naming
        ``group_id`` as a dependency of a later step waits for every step of the group."""
        _check_id(group_id, "group id")
        items = list(jobs.items()) if isinstance(jobs, Mapping) else None
        if items is None:
            if isinstance(jobs, str | bytes) or not isinstance(jobs, SequenceABC):
                raise WorkflowValidationError("add_group needs a sequence or mapping of jobs")
            items = [(f"{group_id}.{index}", job) for index, job in enumerate(jobs)]
        if not items:
            raise WorkflowValidationError(f"group {group_id!r} has no jobs")
        depends_on = _as_ids(dependencies)
        members = []
        for step_id, job in items:
            _check_id(step_id, "step id")
            self._steps.append(WorkflowStep(step_id, _as_job(job), depends_on, group_id=group_id))
            members.append(step_id)
        if group_id in self.groups:
            raise DuplicateStepError(f"workflow {self.name!r} has two groups {group_id!r}")
        self.groups[group_id] = members
        return self

    def validate(self) -> dict[str, list[str]]:
        """Check the graph; returns each step's dependencies with groups expanded to their
        steps. Raises :class:`~chancy.errors.DuplicateStepError`,
        :class:`~chancy.errors.UnknownDependencyError` or
        :class:`~chancy.errors.WorkflowCycleError`."""
        if not self._steps:
            raise WorkflowValidationError(f"workflow {self.name!r} has no steps")
        seen: set[str] = set()
        for step in self._steps:
            if step.step_id in seen:
                raise DuplicateStepError(
                    f"workflow {self.name!r} has two steps with id {step.step_id!r}"
                )
            seen.add(step.step_id)
        for group_id in self.groups:
            if group_id in seen:
                raise DuplicateStepError(
                    f"workflow {self.name!r}: {group_id!r} is both a step and a group id"
                )
        expanded: dict[str, list[str]] = {}
        for step in self._steps:
            deps: dict[str, None] = {}
            for name in step.dependencies:
                if name in self.groups:
                    deps.update(dict.fromkeys(self.groups[name]))
                elif name in seen:
                    deps[name] = None
                else:
                    raise UnknownDependencyError(
                        f"step {step.step_id!r} of workflow {self.name!r} depends on "
                        f"unknown step {name!r}"
                    )
            expanded[step.step_id] = list(deps)
        _check_acyclic(self.name, expanded)
        return expanded

    def to_dot(self) -> str:
        """The graph in Graphviz DOT, one box per step filled by the step's state."""
        return _to_dot(self)

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, id={self.id!r}, state={self.state.value!r})"


class Sequence(Workflow):
    """A workflow whose jobs run one after another; step ids are ``"0"``, ``"1"``, ..."""

    def __init__(self, name: str, jobs: Iterable[Job | JobFunction[Any, Any]]) -> None:
        super().__init__(name)
        previous: str | None = None
        for index, job in enumerate(jobs):
            step_id = str(index)
            self.add(step_id, job, [previous] if previous is not None else None)
            previous = step_id

    async def push(self, chancy: Chancy) -> str:
        """Push the sequence; returns its workflow id."""
        return await WorkflowPlugin.push(chancy, self)


class WorkflowPlugin(Plugin):
    """Advances workflows: at once on the worker that records a step's completion, and
    every ``polling_interval`` seconds on the leader for progress recorded elsewhere.
    The leader also deletes workflows finished more than ``retention`` seconds ago (by
    default a day, like the Pruner's jobs; None keeps them)."""

    def __init__(
        self,
        polling_interval: float = 5,
        batch_size: int = 100,
        *,
        retention: float | None = 86400,
    ) -> None:
        if polling_interval <= 0 or batch_size < 1:
            raise ConfigurationError("WorkflowPlugin needs polling_interval > 0, batch_size >= 1")
        if retention is not None and not retention >= 0:
            raise ConfigurationError("WorkflowPlugin retention must be >= 0 seconds or None")
        self.polling_interval = polling_interval
        self.batch_size = batch_size
        self.retention = retention

    @classmethod
    def get_identifier(cls) -> str:
        return "chancy.workflow"

    def migrations_package(self) -> str | None:
        return "chancy.migrations.workflow"

    # -- worker side ------------------------------------------------------------------

    async def run(self, worker: Worker, chancy: Chancy) -> None:
        finished: set[uuid.UUID] = set()
        started: set[uuid.UUID] = set()
        wake = asyncio.Event()

        def on_started(name: str, job: QueuedJob) -> None:
            workflow_id = _workflow_of(job)
            if workflow_id is not None and job.attempts <= 1:
                started.add(workflow_id)
                wake.set()

        def on_recorded(name: str, batch: list[Outcome]) -> None:
            # Fired after the outcomes are committed, so the advance sees them.
            for outcome in batch:
                workflow_id = _workflow_of(outcome.job)
                if workflow_id is not None and outcome.state in FINISHED_STATES:
                    finished.add(workflow_id)
                    wake.set()

        worker.hub.on("job.started", on_started)
        worker.hub.on("job.recorded", on_recorded)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._on_events(worker, chancy, finished, started, wake))
                group.create_task(self._poll(worker, chancy))
        finally:
            worker.hub.remove("job.started", on_started)
            worker.hub.remove("job.recorded", on_recorded)

    async def _on_events(
        self,
        worker: Worker,
        chancy: Chancy,
        finished: set[uuid.UUID],
        started: set[uuid.UUID],
        wake: asyncio.Event,
    ) -> None:
        """Advance workflows whose steps finished, and mark those whose first step
        started as running, in batches of whatever arrived meanwhile."""
        delay = 0.05
        while not worker.stopping.is_set():
            if not finished and not started:
                await _wait_any(wake, worker.stopping)
                continue
            wake.clear()
            advance = set(finished)
            running = set(started) - advance  # an advance updates the state anyway
            finished.clear()
            started.clear()
            try:
                if running:
                    states = await worker.run_op(workflow_store.mark_running(chancy.store, running))
                    _announce(worker, states)
                if advance:
                    await self._advance(worker, chancy, advance)
                delay = 0.05
            except Exception:
                worker.log.exception("workflow: advancing workflows failed")
                finished.update(advance)
                started.update(running)
                await self.sleep(worker, delay)
                delay = min(delay * 2, 5.0)

    async def _poll(self, worker: Worker, chancy: Chancy) -> None:
        while not worker.stopping.is_set():
            if not worker.is_leader.is_set():
                await _wait_any(worker.is_leader, worker.stopping)
                continue
            try:
                while not worker.stopping.is_set():
                    result = await self._advance(worker, chancy, None)
                    if len(result.touched) < self.batch_size:
                        break
                if self.retention is not None:
                    pruned = await worker.run_op(
                        workflow_store.prune_workflows(chancy.store, self.retention, 1000)
                    )
                    if pruned:
                        worker.hub.emit("workflow.pruned", pruned)
            except Exception:
                # Keep the event-driven loop alive; the next poll tries again.
                worker.log.exception("workflow: polling for workflow progress failed")
            await self.sleep(worker, self.polling_interval)

    async def _advance(
        self, worker: Worker, chancy: Chancy, ids: set[uuid.UUID] | None
    ) -> _Advanced:
        op = workflow_store.advance_workflows(
            chancy.store, ids, notify=chancy.notifications, limit=self.batch_size
        )
        async with worker.pool.connection() as conn, conn.transaction():
            result = await arun(conn, op)
        _announce(worker, result.states)
        return _Advanced(result.locked, result.started)

    # -- client side ------------------------------------------------------------------

    @staticmethod
    async def push(chancy: Chancy, workflow: Workflow) -> str:
        """Validate and store ``workflow`` and push its first steps, in one transaction;
        returns the workflow id. Nothing is stored when validation fails."""
        workflow_id, op = _push_op(chancy, workflow)
        missing = await chancy._run(op, transaction=True)
        if missing:
            raise UnknownQueueError(missing)
        return str(workflow_id)

    @staticmethod
    async def push_ex(
        chancy: Chancy,
        cursor: psycopg.AsyncCursor[Any] | psycopg.AsyncConnection[Any],
        workflow: Workflow,
    ) -> str:
        """:meth:`push` on the caller's connection or cursor, inside the caller's
        transaction: the workflow (and its first jobs) exist if and only if it commits."""
        workflow_id, op = _push_op(chancy, workflow)
        missing = await arun(cursor, op)
        if missing:
            raise UnknownQueueError(missing)
        return str(workflow_id)

    @staticmethod
    async def advance(chancy: Chancy, workflow_ids: Iterable[WorkflowId] | None = None) -> int:
        """Advance workflows now, outside any worker (workers do this by themselves);
        ``None`` means every live workflow with unrecorded progress. Returns how many
        steps were started."""
        ids = None if workflow_ids is None else {_as_uuid(w) for w in workflow_ids}
        started = 0
        while True:
            op = workflow_store.advance_workflows(chancy.store, ids, notify=chancy.notifications)
            result = await chancy._run(op, transaction=True)
            started += result.started
            if ids is not None or len(result.locked) < 100:
                return started

    @staticmethod
    async def fetch_workflow(chancy: Chancy, workflow_id: WorkflowId) -> Workflow | None:
        """The stored workflow with its steps' progress, or None."""
        found = await chancy._run(
            workflow_store.get_workflows(chancy.store, [_as_uuid(workflow_id)])
        )
        return _build(*found[0]) if found else None

    @staticmethod
    async def fetch_workflows(
        chancy: Chancy,
        *,
        states: Iterable[WorkflowState | str] | None = None,
        limit: int = 100,
        before: WorkflowId | None = None,
    ) -> list[Workflow]:
        """Up to ``limit`` workflows (optionally only in ``states``), newest first. For the
        next page pass the id of the last workflow of this one as ``before``."""
        try:
            wanted = None if states is None else [WorkflowState(s).value for s in states]
        except ValueError as exc:
            raise WorkflowValidationError(f"unknown workflow state: {exc}") from None
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise WorkflowValidationError(f"limit must be a positive int, not {limit!r}")
        op = workflow_store.list_workflows(
            chancy.store,
            states=wanted,
            limit=limit,
            before=None if before is None else _as_uuid(before),
        )
        return [_build(row, steps) for row, steps in await chancy._run(op)]

    @staticmethod
    async def wait_for_workflow(
        chancy: Chancy,
        workflow_id: WorkflowId,
        *,
        interval: float = 1,
        timeout: float | None = None,
    ) -> Workflow | None:
        """Wait until the workflow is completed or failed and return it (None if it does
        not exist). Polls at most every ``interval`` seconds, starting fast; raises
        :class:`TimeoutError` after ``timeout`` seconds."""
        target = _as_uuid(workflow_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.01, interval)
        while True:
            workflow = await WorkflowPlugin.fetch_workflow(chancy, target)
            if workflow is None or workflow.state in (
                WorkflowState.COMPLETED,
                WorkflowState.FAILED,
            ):
                return workflow
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"workflow {target} did not finish in {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, interval)

    @staticmethod
    def generate_dot(workflow: Workflow) -> str:
        """The workflow's graph in Graphviz DOT (see :meth:`Workflow.to_dot`)."""
        return _to_dot(workflow)


class _Advanced:
    __slots__ = ("started", "touched")

    def __init__(self, touched: list[uuid.UUID], started: int) -> None:
        self.touched = touched
        self.started = started


def _push_op(chancy: Chancy, workflow: Workflow) -> tuple[uuid.UUID, Op[list[str]]]:
    if not isinstance(workflow, Workflow):
        raise WorkflowValidationError(f"push() needs a Workflow, not {workflow!r}")
    dependencies = workflow.validate()
    steps = [
        workflow_store.StepSpec(step.step_id, step.group_id, step.job, dependencies[step.step_id])
        for step in workflow.steps.values()
    ]
    workflow_id = uuid7()
    op = workflow_store.push_workflow(
        chancy.store,
        workflow_id,
        workflow.name,
        steps,
        require_queues=chancy.require_declared_queues,
        notify=chancy.notifications,
    )
    return workflow_id, op


def _workflow_of(job: Job) -> uuid.UUID | None:
    marker = job.meta.get("workflow")
    if not isinstance(marker, dict):
        return None
    try:
        return uuid.UUID(str(marker.get("id")))
    except ValueError:
        return None


def _announce(worker: Worker, states: Mapping[uuid.UUID, str]) -> None:
    for workflow_id, state in states.items():
        worker.hub.emit("workflow.state", {"id": str(workflow_id), "state": state})


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID or "\x00" in value:
        raise WorkflowValidationError(
            f"{what} must be a non-empty str of at most {_MAX_ID} characters, not {value!r}"
        )


def _as_job(job: object) -> Job:
    if isinstance(job, JobFunction):
        return job.job
    if not isinstance(job, Job):
        raise WorkflowValidationError(f"a workflow step needs a Job, not {job!r}")
    return job


def _as_ids(dependencies: Iterable[str] | str | None) -> list[str]:
    if dependencies is None:
        return []
    if isinstance(dependencies, str):
        return [dependencies]
    ids = list(dependencies)
    for name in ids:
        if not isinstance(name, str):
            raise WorkflowValidationError(f"dependencies must be step ids, not {name!r}")
    return ids


def _as_uuid(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise WorkflowValidationError(f"not a workflow id: {value!r}") from None


def _check_acyclic(name: str, dependencies: dict[str, list[str]]) -> None:
    """Kahn's algorithm; whatever cannot be ordered lies on or behind a cycle."""
    waiting = {step: len(set(deps)) for step, deps in dependencies.items()}
    dependents: dict[str, list[str]] = {step: [] for step in dependencies}
    for step, deps in dependencies.items():
        for dep in set(deps):
            dependents[dep].append(step)
    ready = [step for step, count in waiting.items() if count == 0]
    while ready:
        step = ready.pop()
        for dependent in dependents[step]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    blocked = sorted(step for step, count in waiting.items() if count > 0)
    if blocked:
        shown = ", ".join(repr(s) for s in blocked[:10])
        more = f" and {len(blocked) - 10} more" if len(blocked) > 10 else ""
        raise WorkflowCycleError(
            f"workflow {name!r} has a dependency cycle among steps {shown}{more}"
        )


def _build(row: Row, steps: list[Row]) -> Workflow:
    workflow = Workflow(row["name"])
    workflow.id = str(row["id"])
    workflow.state = WorkflowState(row["state"])
    workflow.created_at = row["created_at"]
    workflow.updated_at = row["updated_at"]
    workflow.completed_at = row["completed_at"]
    for step in steps:
        workflow._steps.append(
            WorkflowStep(
                step["step_id"],
                workflow_store.job_from_spec(step["job"]),
                step["dependencies"],
                group_id=step["group_id"],
                state=step["state"],
                job_id=Reference(step["job_id"]) if step["job_id"] is not None else None,
                job_state=step["job_state"],
                started_at=step["started_at"],
                completed_at=step["completed_at"],
            )
        )
        if step["group_id"] is not None:
            workflow.groups.setdefault(step["group_id"], []).append(step["step_id"])
    return workflow


def _dot_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _to_dot(workflow: Workflow) -> str:
    lines = [
        f"digraph {_dot_string(workflow.name)} {{",
        "  rankdir=LR;",
        f"  label={_dot_string(f'{workflow.name} ({workflow.state.value})')};",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    steps = workflow.steps
    for step in steps.values():
        label = f"{step.step_id}\n{step.job.func}\n{step.state.value}"
        style = ', style="rounded,filled,dashed"' if step.state is StepState.SKIPPED else ""
        lines.append(
            f"  {_dot_string(step.step_id)} [label={_dot_string(label)}, "
            f'fillcolor="{STATE_COLOURS[step.state]}"{style}];'
        )
    for step in steps.values():
        for name in step.dependencies:
            for dep in workflow.groups.get(name, [name]) if name not in steps else [name]:
                lines.append(f"  {_dot_string(dep)} -> {_dot_string(step.step_id)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
