"""Store operations of the workflow plugin: insert a workflow, advance live workflows
(start ready steps through the core push, record finished ones), and read them back.

Every operation returns rows or plain values; :mod:`chancy.plugins.workflow` builds the
public objects. Advancing must run inside one transaction (the caller opens it): it locks
the workflow rows, so any number of workers may advance the same workflows safely.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chancy.job import Job, Limit
from chancy.store import Op, PushResult, Row, Store, dumps

#: The fields of a :class:`~chancy.job.Job` a step keeps as its template.
_SPEC_FIELDS = ("func", "queue", "kwargs", "meta", "limits", "priority", "max_attempts")


@dataclasses.dataclass(frozen=True, slots=True)
class StepSpec:
    """One step as inserted: its id, optional group, job and dependency ids."""

    step_id: str
    group_id: str | None
    job: Job
    dependencies: Sequence[str]


@dataclasses.dataclass(slots=True)
class AdvanceResult:
    """What one advance did: the workflows it locked, how many steps it started and the
    workflows whose state changed."""

    locked: list[uuid.UUID] = dataclasses.field(default_factory=list)
    started: int = 0
    states: dict[uuid.UUID, str] = dataclasses.field(default_factory=dict)


def job_to_spec(job: Job) -> str:
    """The JSON template a step stores for its job (validated as JSON here, before SQL)."""
    spec: dict[str, Any] = {
        "func": job.func,
        "queue": job.queue,
        "kwargs": json.loads(dumps(job.kwargs, f"kwargs of {job.func}")),
        "meta": json.loads(dumps(job.meta, f"meta of {job.func}")),
        "limits": [limit.to_dict() for limit in job.limits],
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "unique_key": job.unique_key,
        "scheduled_at": job.scheduled_at.isoformat() if job.scheduled_at else None,
    }
    return json.dumps(spec, separators=(",", ":"))


def job_from_spec(spec: Mapping[str, Any]) -> Job:
    """Rebuild a step's :class:`Job` from its stored template."""
    scheduled = spec.get("scheduled_at")
    return Job(
        **{name: spec[name] for name in _SPEC_FIELDS if name != "limits"},
        limits=[Limit.from_dict(limit) for limit in spec.get("limits") or ()],
        unique_key=spec.get("unique_key"),
        scheduled_at=dt.datetime.fromisoformat(scheduled) if scheduled else None,
    )


def push_workflow(
    store: Store,
    workflow_id: uuid.UUID,
    name: str,
    steps: Sequence[StepSpec],
    *,
    require_queues: bool,
    notify: bool,
) -> Op[list[str]]:
    """Insert a workflow and its steps, then start the steps that have no dependencies.
    Returns the undeclared queues the steps name (and inserts nothing) when
    ``require_queues`` is set and some are missing; else an empty list."""
    specs = [job_to_spec(step.job) for step in steps]
    if require_queues:
        queues = sorted({step.job.queue for step in steps})
        rows = yield store.q("workflow_select_missing_queues"), {"queues": queues}
        if rows:
            return [r["missing_queue"] for r in rows]
    yield store.q("workflow_insert_one"), {"id": workflow_id, "name": name}
    yield (
        store.q("workflow_insert_steps_many"),
        {
            "workflow_id": workflow_id,
            "step_id": [s.step_id for s in steps],
            "group_id": [s.group_id for s in steps],
            "position": list(range(len(steps))),
            "job": specs,
            "dependencies": [json.dumps(list(s.dependencies)) for s in steps],
        },
    )
    yield from advance_workflows(store, [workflow_id], notify=notify)
    return []


def advance_workflows(
    store: Store,
    ids: Iterable[uuid.UUID] | None,
    *,
    notify: bool,
    limit: int = 100,
) -> Op[AdvanceResult]:
    """Advance the given workflows (waiting for their row locks), or with ``ids=None`` up
    to ``limit`` live workflows that have unrecorded progress (skipping locked ones):
    record finished steps, skip steps that can no longer run, push ready steps in one
    bulk statement and update the workflows' states. Run it inside a transaction."""
    result = AdvanceResult()
    if ids is None:
        rows = yield store.q("workflow_lock_stale_many"), {"limit": limit}
    else:
        wanted = sorted(set(ids))
        if not wanted:
            return result
        rows = yield store.q("workflow_lock_many"), {"ids": wanted}
    locked = [r["id"] for r in rows]
    result.locked = locked
    if not locked:
        return result
    yield store.q("workflow_sync_steps_many"), {"ids": locked}
    yield store.q("workflow_skip_doomed_many"), {"ids": locked}
    ready = yield store.q("workflow_select_ready_many"), {"ids": locked}
    if ready:
        jobs = []
        for row in ready:
            template = job_from_spec(row["job"])
            meta = {
                **template.meta,
                "workflow": {"id": str(row["workflow_id"]), "step": row["step_id"]},
            }
            jobs.append(template.with_meta(meta))
        # Queues were checked when the workflow was pushed; a queue declared later (or
        # deleted since) leaves its job waiting rather than stalling the whole workflow.
        pushed = yield from store.push_jobs(jobs, require_queues=False, notify=notify)
        references = [p.reference.uuid for p in pushed if isinstance(p, PushResult)]
        yield (
            store.q("workflow_start_steps_many"),
            {
                "workflow_id": [r["workflow_id"] for r in ready],
                "step_id": [r["step_id"] for r in ready],
                "job_id": references,
            },
        )
        result.started = len(ready)
    rows = yield store.q("workflow_update_states_many"), {"ids": locked}
    result.states = {r["id"]: r["state"] for r in rows}
    return result


def mark_running(store: Store, ids: Iterable[uuid.UUID]) -> Op[dict[uuid.UUID, str]]:
    """Move the pending workflows among ``ids`` to running (a step's job has started)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = yield store.q("workflow_mark_running_many"), {"ids": wanted}
    return {r["id"]: r["state"] for r in rows}


def prune_workflows(store: Store, age: float, limit: int) -> Op[int]:
    """Delete at most ``limit`` workflows finished more than ``age`` seconds ago."""
    rows = yield store.q("workflow_prune_many"), {"age": float(age), "limit": limit}
    return len(rows)


def get_workflows(store: Store, ids: Iterable[uuid.UUID]) -> Op[list[tuple[Row, list[Row]]]]:
    """The workflows among ``ids`` with their steps (missing ones are left out)."""
    rows = yield store.q("workflow_select_many"), {"ids": list(ids)}
    return (yield from _with_steps(store, rows))


def list_workflows(
    store: Store,
    *,
    states: Sequence[str] | None,
    limit: int,
    before: uuid.UUID | None,
) -> Op[list[tuple[Row, list[Row]]]]:
    """Up to ``limit`` workflows, newest first, older than ``before`` if given."""
    rows = yield (
        store.q("workflow_select_page"),
        {"states": list(states) if states is not None else None, "limit": limit, "before": before},
    )
    return (yield from _with_steps(store, rows))


def _with_steps(store: Store, rows: list[Row]) -> Op[list[tuple[Row, list[Row]]]]:
    if not rows:
        return []
    steps = yield store.q("workflow_select_steps_many"), {"ids": [r["id"] for r in rows]}
    by_workflow: dict[uuid.UUID, list[Row]] = {r["id"]: [] for r in rows}
    for step in steps:
        by_workflow[step["workflow_id"]].append(step)
    return [(row, by_workflow[row["id"]]) for row in rows]
