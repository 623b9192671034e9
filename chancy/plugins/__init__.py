"""Built-in plugins. :func:`default_plugins` lists those every Chancy gets unless
``no_default_plugins=True``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chancy.plugin import Plugin


def default_plugins() -> list[Plugin]:
    """Fresh instances of the default plugins: Leadership, Recovery, Pruner,
    Metrics and WorkflowPlugin."""
    from chancy.plugins.leadership import Leadership
    from chancy.plugins.metrics import Metrics
    from chancy.plugins.pruner import Pruner
    from chancy.plugins.recovery import Recovery
    from chancy.plugins.workflow import WorkflowPlugin

    return [Leadership(), Recovery(), Pruner(), Metrics(), WorkflowPlugin()]
