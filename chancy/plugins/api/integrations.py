"""Read access to the optional cron, workflow and metrics plugins.

Each helper imports its plugin lazily and answers :class:`Unavailable` (with a reason to
show) when the plugin is not installed or its tables were never migrated, so that the
dashboard pages never fail because a plugin is absent.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

import psycopg

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


async def _call(what: str, coroutine_factory: Any) -> Any:
    try:
        return await coroutine_factory()
    except psycopg.errors.UndefinedTable:
        return Unavailable(f"the {what} tables do not exist: run chancy.migrate() with it")
    except psycopg.errors.UndefinedFunction:
        return Unavailable(f"the {what} schema is out of date: run chancy.migrate()")


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
    """One workflow (``WorkflowPlugin.fetch_workflow``), None if missing."""
    plugin = _plugin_class("chancy.plugins.workflow", "WorkflowPlugin")
    if plugin is None:
        return Unavailable("the workflow plugin is not available in this installation")
    return await _call("workflow plugin's", lambda: plugin.fetch_workflow(chancy, workflow_id))


async def metrics(chancy: Chancy, **options: Any) -> Any:
    """Metrics recorded by the metrics plugin (``Metrics.get_metrics``)."""
    plugin = _plugin_class("chancy.plugins.metrics", "Metrics")
    if plugin is None:
        return Unavailable("the metrics plugin is not available in this installation")
    return await _call("metrics plugin's", lambda: plugin.get_metrics(chancy, **options))


def to_plain(value: Any) -> Any:
    """Dataclasses and objects with ``to_dict`` become dicts (for JSON and templates)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value
