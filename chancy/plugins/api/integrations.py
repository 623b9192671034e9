"""Read access to the optional cron, workflow and metrics plugins.

Each helper imports its plugin lazily and answers :class:`Unavailable` (with a reason to
show) when the plugin is not installed or its tables were never migrated, so that the
dashboard pages never fail because a plugin is absent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg

from chancy.errors import ChancyError, ConfigurationError

if TYPE_CHECKING:
    from chancy.app import Chancy


@dataclasses.dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a plugin's data cannot be shown."""

    reason: str


def _plugin_class(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


async def _call(what: str, coroutine_factory: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await coroutine_factory()
    except psycopg.errors.UndefinedTable:
        return Unavailable(
            f"the {what} tables do not exist: add the plugin and run chancy.migrate()"
        )
    except psycopg.errors.UndefinedFunction:
        return Unavailable(f"the {what} schema is out of date: run chancy.migrate()")
    except ConfigurationError as exc:  # the plugins' own "tables missing" message
        return Unavailable(str(exc))


async def cron_schedules(chancy: Chancy) -> dict[str, dict[str, Any]] | Unavailable:
    """Every cron schedule (``Cron.get_schedules``)."""
    cron = _plugin_class("chancy.plugins.cron", "Cron")
    if cron is None:
        return Unavailable("the cron plugin is not available in this installation")
    return await _call("cron plugin's", lambda: cron.get_schedules(chancy))  # type: ignore[no-any-return]


async def workflows(
    chancy: Chancy, *, states: list[str] | None, limit: int, before: str | None
) -> list[Any] | Unavailable:
    """Recent workflows (``WorkflowPlugin.fetch_workflows``)."""
    plugin = _plugin_class("chancy.plugins.workflow", "WorkflowPlugin")
    if plugin is None:
        return Unavailable("the workflow plugin is not available in this installation")
    return await _call(  # type: ignore[no-any-return]
        "workflow plugin's",
        lambda: plugin.fetch_workflows(chancy, states=states, limit=limit, before=before),
    )


async def workflow(chancy: Chancy, workflow_id: str) -> Any:
    """One workflow (``WorkflowPlugin.fetch_workflow``), None if missing or if the id is
    not a workflow id."""
    plugin = _plugin_class("chancy.plugins.workflow", "WorkflowPlugin")
    if plugin is None:
        return Unavailable("the workflow plugin is not available in this installation")

    async def fetch() -> Any:
        try:
            return await plugin.fetch_workflow(chancy, workflow_id)
        except ConfigurationError:
            raise
        except (ChancyError, ValueError):
            return None

    return await _call("workflow plugin's", fetch)


def workflow_dict(workflow: Any) -> dict[str, Any]:
    """A JSON-friendly view of a workflow and its steps (duck-typed on the workflow
    plugin's ``Workflow`` and ``WorkflowStep``)."""
    plain = to_plain(workflow)
    if isinstance(plain, dict):
        return plain
    groups = getattr(workflow, "groups", None) or {}
    steps = {}
    for step_id, step in (getattr(workflow, "steps", None) or {}).items():
        job = getattr(step, "job", None)
        job_id = getattr(step, "job_id", None)
        steps[str(step_id)] = {
            "step_id": str(step_id),
            "func": getattr(job, "func", None),
            "queue": getattr(job, "queue", None),
            "dependencies": [str(d) for d in getattr(step, "dependencies", ())],
            "group_id": getattr(step, "group_id", None),
            "state": _value(getattr(step, "state", "pending")),
            "job_id": str(job_id) if job_id is not None else None,
            "job_state": getattr(step, "job_state", None),
            "started_at": getattr(step, "started_at", None),
            "completed_at": getattr(step, "completed_at", None),
        }
    return {
        "id": str(getattr(workflow, "id", "")),
        "name": getattr(workflow, "name", ""),
        "state": _value(getattr(workflow, "state", "")),
        "created_at": getattr(workflow, "created_at", None),
        "updated_at": getattr(workflow, "updated_at", None),
        "completed_at": getattr(workflow, "completed_at", None),
        "steps": steps,
        "groups": {str(k): [str(m) for m in v] for k, v in groups.items()},
    }


def _value(state: Any) -> str:
    return str(getattr(state, "value", state))


COUNTERS = ("jobs.succeeded", "jobs.failed", "jobs.retried", "jobs.cancelled")
GAUGES = ("queue.depth", "queue.running")


def resolution_for(window: int) -> tuple[str, int]:
    """The metrics resolution (and its seconds) that draws ``window`` in few points."""
    if window <= 6 * 3600:
        return "1m", 60
    if window <= 3 * 86400:
        return "5m", 300
    return "1h", 3600


async def metrics(chancy: Chancy, *, window: int = 3600, queue: str | None = None) -> Any:
    """Series from the metrics plugin (``Metrics.get_metrics``) over the last ``window``
    seconds: ``{"counts": {...}, "durations": {...}, "gauges": {...}}``, each with a
    ``t`` list of bucket starts (epoch seconds) and one list per series."""
    plugin = _plugin_class("chancy.plugins.metrics", "Metrics")
    if plugin is None:
        return Unavailable("the metrics plugin is not available in this installation")
    resolution, step = resolution_for(window)

    async def fetch() -> Any:
        return await plugin.get_metrics(
            chancy,
            resolution=resolution,
            since=dt.timedelta(seconds=window),
            queue=queue,
            names=[*COUNTERS, "jobs.duration", *GAUGES],
            per="none",
        )

    points = await _call("metrics plugin's", fetch)
    if isinstance(points, Unavailable):
        return points
    end = int(time.time()) // step * step
    times = list(range(end - window + step, end + step, step))
    index = {t: i for i, t in enumerate(times)}
    empty: list[float | None] = [None] * len(times)
    counts: dict[str, list[Any]] = {name: [0] * len(times) for name in COUNTERS}
    durations: dict[str, list[Any]] = {"mean (s)": list(empty), "max (s)": list(empty)}
    gauges: dict[str, list[Any]] = {name: list(empty) for name in GAUGES}
    for point in points:
        position = index.get(int(point.bucket_start.timestamp()))
        if position is None:
            continue
        if point.name in counts:
            counts[point.name][position] += point.count
        elif point.name == "jobs.duration" and point.count:
            durations["mean (s)"][position] = point.total / point.count
            durations["max (s)"][position] = point.maximum
        elif point.name in gauges and point.count:
            gauges[point.name][position] = point.total / point.count
    return {
        "resolution": resolution,
        "counts": {"t": times, **counts},
        "durations": {"t": times, **durations},
        "gauges": {"t": times, **gauges},
    }


def to_plain(value: Any) -> Any:
    """Dataclasses and objects with ``to_dict`` become dicts (for JSON and templates)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value
