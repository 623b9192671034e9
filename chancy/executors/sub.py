"""Run jobs in sub-interpreters (Python 3.13+): parallel Python without extra processes.

Each pool thread owns one isolated interpreter, created on first use and reused. Kwargs go
in and results come out as JSON text. Like threads, a running job cannot be pre-empted:
time limits and cancellation free its slot and discard its late result. C extensions that
do not support sub-interpreters (including psycopg's binary build and numpy) cannot be
imported by such jobs.
"""

from __future__ import annotations

import json
import sys
import threading
from types import ModuleType
from typing import Any

from chancy.errors import Snooze, UnsupportedExecutorError
from chancy.executors.thread import ThreadedExecutor
from chancy.job import QueuedJob

_interpreters: ModuleType | None
_interpqueues: ModuleType | None
try:  # the low-level modules of PEP 734, present in CPython 3.13
    import _interpqueues  # type: ignore[import-not-found,no-redef,unused-ignore]
    import _interpreters  # type: ignore[import-not-found,no-redef,unused-ignore]
except ImportError:
    _interpreters = _interpqueues = None

#: Runs once in each new interpreter; ``_run`` is called once per job.
_BOOTSTRAP = """
import importlib, json, sys, traceback, _interpqueues
sys.path[:] = list(_parent_path)

def _resolve(path):
    if ":" in path:
        module, _, qualname = path.partition(":")
        candidates = [(module, qualname)]
    else:
        parts = path.split(".")
        candidates = [
            (".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)
        ]
    error = None
    for module, qualname in candidates:
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            error = exc
            continue
        for attribute in qualname.split("."):
            obj = getattr(obj, attribute)
        return getattr(obj, "func", obj)
    raise ImportError(f"cannot import job function {path}: {error}")

def _run():
    try:
        result = _resolve(_func)(**json.loads(_kwargs))
        out = ("ok", json.dumps(result, default=repr))
    except BaseException as exc:
        types = [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__ if c is not object]
        snooze = getattr(exc, "delay", None) if "chancy.errors.Snooze" in types else None
        detail = {"traceback": traceback.format_exc(), "types": types, "snooze": snooze}
        out = ("error", json.dumps(detail))
    _interpqueues.put(_queue_id, out, 0, 3)
"""


def require_subinterpreters() -> None:
    """Raise :class:`UnsupportedExecutorError` unless this Python has sub-interpreters."""
    if _interpreters is None or sys.version_info < (3, 13):
        version = ".".join(map(str, sys.version_info[:3]))
        raise UnsupportedExecutorError(
            f"SubInterpreterExecutor needs CPython 3.13 or newer (with _interpreters); "
            f"this is Python {version}"
        )


class SubInterpreterExecutor(ThreadedExecutor):
    """Each job runs in the sub-interpreter owned by a pooled thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_subinterpreters()
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        self._created: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def _interpreter(self) -> tuple[int, int]:
        state: tuple[int, int] | None = getattr(self._local, "state", None)
        if state is None:
            assert _interpreters is not None and _interpqueues is not None
            interp = _interpreters.create()
            queue_id = _interpqueues.create(0, 0, 3)
            _interpreters.set___main___attrs(
                interp, {"_parent_path": tuple(sys.path), "_queue_id": queue_id}
            )
            failure = _interpreters.exec(interp, _BOOTSTRAP)
            if failure is not None:
                raise RuntimeError(f"sub-interpreter bootstrap failed: {failure.errdisplay}")
            state = (interp, queue_id)
            self._local.state = state
            with self._lock:
                self._created.append(state)
        return state

    def call(self, job: QueuedJob) -> Any:
        assert _interpreters is not None and _interpqueues is not None
        interp, queue_id = self._interpreter()
        _interpreters.set___main___attrs(
            interp, {"_func": job.func, "_kwargs": json.dumps(dict(job.kwargs))}
        )
        failure = _interpreters.exec(interp, "_run()")
        if failure is not None:
            raise RuntimeError(failure.errdisplay)
        (status, payload), _, _ = _interpqueues.get(queue_id)
        if status != "ok":
            detail = json.loads(payload)
            if detail.get("snooze") is not None:
                raise Snooze(float(detail["snooze"]))
            error = SubInterpreterJobError(detail["traceback"])
            error.chancy_exception_types = list(detail["types"])
            raise error
        return json.loads(payload)

    def _call(self, loop: Any, job: QueuedJob) -> tuple[Any, bool]:
        # No connection or progress sink crosses into a sub-interpreter.
        return self.call(job), False

    async def stop(self) -> None:
        await super().stop()
        # Interpreters stay until the process exits unless destroyed; destroy those whose
        # threads are idle-exited (a running one refuses, which is fine).
        assert _interpreters is not None and _interpqueues is not None
        with self._lock:
            created, self._created = self._created, []
        for interp, queue_id in created:
            try:
                _interpreters.destroy(interp)
                _interpqueues.destroy(queue_id)
            except Exception:
                with self._lock:
                    self._created.append((interp, queue_id))


class SubInterpreterJobError(Exception):
    """A job failed inside a sub-interpreter; the message is its traceback there."""

    #: Import paths of the exception raised there (for ``retry_on`` matching).
    chancy_exception_types: list[str] | None = None
