"""Push-time checks of a job's kwargs against its function's signature.

Only functions decorated with :func:`chancy.job` are checked, and only when their module is
already imported in the pushing process: pushing by name must never import (and run) a
module, and a plain function may be a stand-in that the workers resolve differently.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

from chancy.errors import JobArgumentsError
from chancy.executors.base import injected_parameters
from chancy.job import Job, JobFunction


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    accepted: frozenset[str]
    required: frozenset[str]
    any_keyword: bool
    validator: Any = None


_shapes: dict[str, _Shape | None] = {}


def _loaded_function(path: str) -> Any:
    """The object at ``path`` if its module is already imported, else None."""
    if ":" in path:
        module_name, _, qualname = path.partition(":")
        candidates = [(module_name, qualname)]
    else:
        parts = path.split(".")
        candidates = [
            (".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)
        ]
    for module_name, qualname in candidates:
        obj: Any = sys.modules.get(module_name)
        if obj is None:
            continue
        for attribute in qualname.split("."):
            obj = getattr(obj, attribute, None)
            if obj is None:
                return None
        return obj
    return None


def _shape_of(func: JobFunction[Any, Any]) -> _Shape:
    inner = func.func
    signature = inspect.signature(inner)
    injected = injected_parameters(inner)
    accepted: set[str] = set()
    required: set[str] = set()
    any_keyword = False
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            any_keyword = True
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        if name in injected:
            continue
        accepted.add(name)
        if param.default is inspect.Parameter.empty:
            required.add(name)
    return _Shape(frozenset(accepted), frozenset(required), any_keyword)


def check_job_arguments(job: Job) -> None:
    """Raise :class:`JobArgumentsError` if ``job.kwargs`` cannot call its ``@job``
    function: an unknown keyword, or a required one missing."""
    shape = _shapes.get(job.func)
    if shape is None:
        if job.func in _shapes:
            return  # known not to be a @job function
        obj = _loaded_function(job.func)
        if obj is None:
            return  # not imported here: nothing to check against (and not cached)
        shape = _shape_of(obj) if isinstance(obj, JobFunction) else None
        if len(_shapes) < 10_000:
            _shapes[job.func] = shape
        if shape is None:
            return
    names = job.kwargs.keys()
    if not shape.any_keyword:
        unknown = sorted(set(names) - shape.accepted)
        if unknown:
            raise JobArgumentsError(
                f"{job.func} got unexpected keyword argument(s): {', '.join(unknown)}"
            )
    missing = sorted(shape.required - set(names))
    if missing:
        raise JobArgumentsError(
            f"{job.func} is missing required keyword argument(s): {', '.join(missing)}"
        )
