"""Push-time checks of a job's kwargs against its function's signature.

Only functions decorated with :func:`chancy.job` are checked, and only when their module is
already imported in the pushing process: pushing by name must never import (and run) a
module, and a plain function may be a stand-in that the workers resolve differently.

Names are always checked. With ``Chancy(validate_kwarg_types=True)`` (``pip install
chancy[pydantic]``) each value is also checked, strictly, against its parameter's type
annotation *as the job will receive it* (after the JSON round trip).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any

from chancy.errors import JobArgumentsError
from chancy.executors.base import injected_parameters
from chancy.job import Job, JobFunction


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    accepted: frozenset[str]
    required: frozenset[str]
    any_keyword: bool
    function: Any = None
    #: Parameter name -> pydantic TypeAdapter, built on the first typed check.
    adapters: dict[str, Any] | None = None


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
    return _Shape(frozenset(accepted), frozenset(required), any_keyword, inner)


def _adapters(shape: _Shape) -> dict[str, Any]:
    """TypeAdapters for the annotated parameters pydantic understands (others are left
    unchecked: an annotation is a hint, not a contract Chancy can always evaluate)."""
    if shape.adapters is not None:
        return shape.adapters
    from pydantic import TypeAdapter

    adapters: dict[str, Any] = {}
    try:
        hints = typing.get_type_hints(shape.function)
    except Exception:
        hints = {}
    for name in shape.accepted:
        if name in hints:
            try:
                adapters[name] = TypeAdapter(hints[name])
            except Exception:
                continue
    object.__setattr__(shape, "adapters", adapters)
    return adapters


RoundTrip = Callable[[Mapping[str, Any]], Any]


def _shape_for(func: str) -> _Shape | None:
    shape = _shapes.get(func)
    if shape is None and func not in _shapes:
        obj = _loaded_function(func)
        if obj is None:
            return None  # not imported here: nothing to check against (and not cached)
        shape = _shape_of(obj) if isinstance(obj, JobFunction) else None
        if len(_shapes) < 10_000:
            _shapes[func] = shape
    return shape


def has_signature(func: str) -> bool:
    """Whether :func:`check_job_arguments` has a signature to check ``func``'s jobs
    against now; a bulk push asks once per function rather than once per job."""
    return _shape_for(func) is not None


def check_job_arguments(job: Job, round_trip: RoundTrip | None = None) -> None:
    """Raise :class:`JobArgumentsError` if ``job.kwargs`` cannot call its ``@job``
    function: an unknown keyword, or a required one missing. With ``round_trip`` (the
    kwargs encoded and decoded as a worker will receive them), also a value that does
    not strictly match its parameter's annotation."""
    shape = _shape_for(job.func)
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
    if round_trip is not None:
        _check_types(job, shape, round_trip)


def _check_types(job: Job, shape: _Shape, round_trip: RoundTrip) -> None:
    from pydantic import ValidationError

    adapters = _adapters(shape)
    if not adapters or not any(name in adapters for name in job.kwargs):
        return
    try:
        received = round_trip(job.kwargs)
    except (TypeError, ValueError):
        return  # not JSON: the store refuses it with its own error
    for name, adapter in adapters.items():
        if name not in received:
            continue
        try:
            adapter.validate_python(received[name], strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "".join(f"[{part!r}]" for part in first.get("loc", ()))
            raise JobArgumentsError(
                f"{job.func}: argument {name}{where} ({received[name]!r} as the job receives "
                f"it): {first.get('msg', exc)}"
            ) from None
