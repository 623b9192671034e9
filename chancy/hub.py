"""A tiny in-process event hub: the worker announces what happens; anyone may listen."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[str, Any], Awaitable[None] | None]
log = logging.getLogger("chancy.hub")


class Hub:
    """Local pub/sub of named events (``job.completed``, ``queue.started``, ...)."""

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[Handler]] = defaultdict(list)
        self._waiters: defaultdict[str, list[asyncio.Future[Any]]] = defaultdict(list)

    def on(self, name: str, handler: Handler) -> None:
        """Call ``handler(name, payload)`` whenever ``name`` is emitted."""
        self._handlers[name].append(handler)

    def remove(self, name: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``name``."""
        if handler in self._handlers.get(name, []):
            self._handlers[name].remove(handler)

    def emit(self, name: str, payload: Any = None) -> None:
        """Announce ``name``; wakes waiters and schedules async handlers."""
        waiters = self._waiters.pop(name, None)
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(payload)
        handlers = self._handlers.get(name)
        if not handlers:
            return
        for handler in tuple(handlers):
            try:
                outcome = handler(name, payload)
                if outcome is not None and asyncio.iscoroutine(outcome):
                    task = asyncio.ensure_future(outcome)
                    task.add_done_callback(_log_failure)
            except Exception:
                log.exception("hub handler for %s failed", name)

    async def wait_for(self, name: str, timeout: float | None = None) -> Any:
        """Wait for the next ``name`` event and return its payload."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[name].append(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if future in self._waiters.get(name, []):
                self._waiters[name].remove(future)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("hub handler failed", exc_info=task.exception())
