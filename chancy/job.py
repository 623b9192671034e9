"""Value types describing jobs: :class:`Job`, :class:`QueuedJob`, :class:`Reference`,
:class:`Limit` and the :func:`job` decorator. Nothing here knows SQL or the runtime."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import inspect
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, overload

from chancy.errors import InvalidNameError, JobValidationError

P = ParamSpec("P")
R = TypeVar("R")

#: Inclusive range accepted for :attr:`Job.priority` (the column is a ``smallint``).
PRIORITY_MIN = -32768
PRIORITY_MAX = 32767
_INT32_MAX = 2**31 - 1

_FUNC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid queue name {name!r}: use 1-100 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return name


_uuid_lock = threading.Lock()
_uuid_last_ms = 0
_uuid_seq = 0


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (version 7); monotonic within this process."""
    global _uuid_last_ms, _uuid_seq
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _uuid_last_ms:
            _uuid_last_ms = ms
            _uuid_seq = int.from_bytes(os.urandom(2)) & 0x3FF
        else:
            _uuid_seq += 1
            if _uuid_seq > 0xFFF:
                _uuid_last_ms += 1
                _uuid_seq = 0
        ms = _uuid_last_ms
        seq = _uuid_seq
    rand = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    return uuid.UUID(int=value)


_UUID = uuid.UUID  # Reference's body shadows the module name with its ``uuid`` property


class Reference:
    """A handle on a pushed job: wraps its UUID and compares equal to its str or UUID.

    It hashes like its string, so ``{ref: ...}.get(str(ref))`` works (a bare UUID key
    does not find it)."""

    __slots__ = ("_hash", "_id")

    def __init__(self, identifier: str | uuid.UUID | Reference) -> None:
        self._hash: int | None = None
        if isinstance(identifier, Reference):
            self._id: uuid.UUID = identifier._id
        elif isinstance(identifier, uuid.UUID):
            self._id = identifier
        else:
            try:
                self._id = uuid.UUID(str(identifier))
            except ValueError:
                raise JobValidationError(f"not a job id: {identifier!r}") from None

    @property
    def identifier(self) -> str:
        """The job id as a string."""
        return str(self._id)

    @property
    def uuid(self) -> uuid.UUID:
        """The job id as a :class:`uuid.UUID`."""
        return self._id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Reference):
            return self._id == other._id
        if isinstance(other, uuid.UUID):
            return self._id == other
        if isinstance(other, str):
            try:
                return self._id == uuid.UUID(other)
            except ValueError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        # Hashes as its string, so a dict keyed by references finds str(ref) too; cached,
        # since formatting the UUID is most of the cost and workers hash each job often.
        if self._hash is None:
            self._hash = hash(str(self._id))
        return self._hash

    @classmethod
    def _of(cls, value: _UUID) -> Reference:
        # For UUIDs read from the database: no type dispatch.
        ref = object.__new__(cls)
        ref._id = value
        ref._hash = None
        return ref

    def __reduce__(self) -> tuple[type[Reference], tuple[object]]:
        # The cached hash is per process (str hashing is salted): never carry it along.
        return (Reference, (self._id,))

    def __str__(self) -> str:
        return str(self._id)

    def __repr__(self) -> str:
        return f"Reference({str(self._id)!r})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limit:
    """A resource limit on one job: ``TIME`` in seconds or ``MEMORY`` in bytes."""

    class Type(enum.StrEnum):
        TIME = "time"
        MEMORY = "memory"

    type: Limit.Type
    value: int | float

    def __init__(self, type: Limit.Type | str, value: int | float) -> None:
        try:
            kind = Limit.Type(type)
        except ValueError:
            raise JobValidationError(f"unknown limit type {type!r}: use time or memory") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < float("inf")
        ):
            raise JobValidationError(
                f"{kind.value} limit must be a positive finite number, not {value!r}"
            )
        if kind is Limit.Type.MEMORY and not float(value).is_integer():
            raise JobValidationError("memory limit must be a whole number of bytes")
        object.__setattr__(self, "type", kind)
        object.__setattr__(self, "value", int(value) if kind is Limit.Type.MEMORY else value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the jobs table."""
        return {"type": self.type.value, "value": self.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limit:
        """Rebuild a limit from :meth:`to_dict` output."""
        return cls(data["type"], data["value"])


#: Function paths and queue names already found valid (exact ``str`` only), so that a
#: bulk push of one function to one queue matches each regex once, not once per job.
_valid_funcs: set[str] = set()
_valid_queues: set[str] = set()
_VALID_NAMES_MAX = 10_000


def _check_func(func: object) -> None:
    if type(func) is str and func in _valid_funcs:
        return
    if not isinstance(func, str) or len(func) > 1000 or not _FUNC_RE.fullmatch(func):
        raise InvalidNameError(
            f"invalid job function {func!r}: expected an import path like 'module.function'"
        )
    if type(func) is str and len(_valid_funcs) < _VALID_NAMES_MAX:
        _valid_funcs.add(func)


def _check_queue(queue: object) -> None:
    if type(queue) is str and queue in _valid_queues:
        return
    validate_queue_name(queue)
    if type(queue) is str and len(_valid_queues) < _VALID_NAMES_MAX:
        _valid_queues.add(queue)


def _check_str_keys(mapping: object, what: str) -> None:
    if type(mapping) is not dict and not isinstance(mapping, Mapping):
        raise JobValidationError(f"{what} must be a mapping with str keys")
    for key in mapping:
        if type(key) is not str and not isinstance(key, str):
            raise JobValidationError(f"{what} must be a mapping with str keys")


def _check_job_fields(job: Job) -> None:
    # Exact-type tests come first: they decide the common case without isinstance.
    _check_func(job.func)
    _check_queue(job.queue)
    priority = job.priority
    if type(priority) is not int and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise JobValidationError(f"priority must be an int, not {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise JobValidationError(
            f"priority {priority} out of range [{PRIORITY_MIN}, {PRIORITY_MAX}]"
        )
    attempts = job.max_attempts
    if type(attempts) is not int and (isinstance(attempts, bool) or not isinstance(attempts, int)):
        raise JobValidationError(f"max_attempts must be an int, not {attempts!r}")
    if not 1 <= attempts <= _INT32_MAX:
        raise JobValidationError(f"max_attempts must be >= 1, not {attempts}")
    if job.scheduled_at is not None:
        if not isinstance(job.scheduled_at, dt.datetime):
            raise JobValidationError(f"scheduled_at must be a datetime, not {job.scheduled_at!r}")
        if job.scheduled_at.tzinfo is None or job.scheduled_at.utcoffset() is None:
            raise JobValidationError(
                "scheduled_at must be timezone-aware (e.g. datetime.now(timezone.utc))"
            )
    _check_str_keys(job.kwargs, "kwargs")
    _check_str_keys(job.meta, "meta")
    if job.limits and not all(isinstance(limit, Limit) for limit in job.limits):
        raise JobValidationError("limits must be Limit instances")
    if job.unique_key is not None and (
        not isinstance(job.unique_key, str)
        or not 0 < len(job.unique_key) <= 1024
        or "\x00" in job.unique_key
    ):
        raise JobValidationError(
            "unique_key must be a non-empty str of at most 1024 characters, without NUL"
        )
    if job.concurrency_key is not None and (
        not isinstance(job.concurrency_key, str)
        or not 0 < len(job.concurrency_key) <= 1024
        or "\x00" in job.concurrency_key
    ):
        raise JobValidationError(
            "concurrency_key must be a non-empty str of at most 1024 characters, without NUL"
        )


class _Fresh:
    """Stands for "a new empty one" as a default in :class:`Job`'s signature."""

    def __repr__(self) -> str:
        return "<factory>"


_FRESH: Any = _Fresh()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """An immutable description of work to run: a function path and its keyword arguments.

    ``scheduled_at=None`` means "now" by the database clock.
    """

    func: str
    queue: str = "default"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 1
    scheduled_at: dt.datetime | None = None
    limits: list[Limit] = dataclasses.field(default_factory=list)
    unique_key: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Jobs of one queue sharing this key run at most ``Queue.concurrency_key_limit`` at a
    #: time across all workers, in fetch order (e.g. ``"customer:42"``).
    concurrency_key: str | None = None

    # Written out rather than generated: a frozen dataclass's __init__ sets each field
    # through object.__setattr__, which cost ~1 us a job in a bulk push. The signature
    # is the generated one's (tests compare them); ``_FRESH`` marks a default factory.
    def __init__(
        self,
        *,
        func: str,
        queue: str = "default",
        kwargs: Mapping[str, Any] = _FRESH,
        priority: int = 0,
        max_attempts: int = 1,
        scheduled_at: dt.datetime | None = None,
        limits: list[Limit] = _FRESH,
        unique_key: str | None = None,
        meta: Mapping[str, Any] = _FRESH,
        concurrency_key: str | None = None,
    ) -> None:
        fields = self.__dict__
        fields["func"] = func
        fields["queue"] = queue
        fields["kwargs"] = {} if kwargs is _FRESH else kwargs
        fields["priority"] = priority
        fields["max_attempts"] = max_attempts
        fields["scheduled_at"] = scheduled_at
        fields["limits"] = limits
        fields["unique_key"] = unique_key
        fields["meta"] = {} if meta is _FRESH else meta
        fields["concurrency_key"] = concurrency_key
        self.__post_init__()

    def __post_init__(self) -> None:
        limits = self.limits
        if limits is _FRESH:
            self.__dict__["limits"] = []
        elif type(limits) is list or isinstance(limits, (list, tuple)):
            self.__dict__["limits"] = list(limits)
        else:
            raise JobValidationError("limits must be a list of Limit")
        _check_job_fields(self)

    @classmethod
    def from_func(cls, func: Callable[..., Any], **fields: Any) -> Job:
        """Build a job for ``func`` (a module-level function) with the given fields."""
        return cls(func=function_path(func), **fields)

    def _replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    def with_priority(self, priority: int) -> Job:
        """A copy with another priority (higher runs first)."""
        return self._replace(priority=priority)

    def with_max_attempts(self, max_attempts: int) -> Job:
        """A copy allowing ``max_attempts`` runs in total."""
        return self._replace(max_attempts=max_attempts)

    def with_scheduled_at(self, scheduled_at: dt.datetime | None) -> Job:
        """A copy that will not run before ``scheduled_at``."""
        return self._replace(scheduled_at=scheduled_at)

    def with_limits(self, limits: list[Limit] | tuple[Limit, ...]) -> Job:
        """A copy with these resource limits."""
        return self._replace(limits=list(limits))

    def with_kwargs(self, **kwargs: Any) -> Job:
        """A copy whose kwargs are updated with ``kwargs``."""
        return self._replace(kwargs={**self.kwargs, **kwargs})

    def with_unique_key(self, unique_key: str | None) -> Job:
        """A copy that is deduplicated on ``unique_key`` while pending or running."""
        return self._replace(unique_key=unique_key)

    def with_concurrency_key(self, concurrency_key: str | None) -> Job:
        """A copy that shares a concurrency limit with the queue's jobs of the same key."""
        return self._replace(concurrency_key=concurrency_key)

    def with_queue(self, queue: str) -> Job:
        """A copy that goes to another queue."""
        return self._replace(queue=queue)

    def with_meta(self, meta: Mapping[str, Any]) -> Job:
        """A copy with its meta replaced by ``meta``."""
        return self._replace(meta=dict(meta))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueuedJob(Job):
    """A job as stored in the database, with its id, state and history."""

    class State(enum.StrEnum):
        PENDING = "pending"
        RUNNING = "running"
        RETRYING = "retrying"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    id: Reference
    state: QueuedJob.State = State.PENDING
    attempts: int = 0
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    result: Any = None
    taken_by: str | None = None
    #: The latest progress the job reported: ``{"percent": 0-100, "message": str|None}``.
    progress: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Rows come from the database, which already enforces the invariants.
        if not isinstance(self.limits, list):
            object.__setattr__(self, "limits", list(self.limits))

    @property
    def is_finished(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.state in FINISHED_STATES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (datetimes as ISO 8601 strings), for the CLI and APIs."""

        def iso(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": str(self.id),
            "queue": self.queue,
            "func": self.func,
            "kwargs": dict(self.kwargs),
            "state": self.state.value,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "unique_key": self.unique_key,
            "concurrency_key": self.concurrency_key,
            "limits": [limit.to_dict() for limit in self.limits],
            "meta": dict(self.meta),
            "created_at": iso(self.created_at),
            "scheduled_at": iso(self.scheduled_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "taken_by": self.taken_by,
            "result": self.result,
            "progress": self.progress,
            "errors": list(self.errors),
        }


FINISHED_STATES = frozenset(
    {QueuedJob.State.SUCCEEDED, QueuedJob.State.FAILED, QueuedJob.State.CANCELLED}
)


def function_path(func: Callable[..., Any]) -> str:
    """The import path (``module.qualname``) a worker uses to find ``func``."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise InvalidNameError(f"{func!r} is not importable: use a module-level function")
    return f"{module}.{qualname}"


class JobFunction(Generic[P, R]):
    """A function decorated with :func:`job`: still callable, with a ``.job`` template."""

    def __init__(self, func: Callable[P, R], template: Job) -> None:
        self.func = func
        self.job = template
        self._signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def bind(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """The ``.job`` template with these arguments, checked against the signature."""
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise JobValidationError(f"{self.job.func}: {exc}") from None
        return self.job.with_kwargs(**bound.arguments)


@overload
def job(func: Callable[P, R], /) -> JobFunction[P, R]: ...


@overload
def job(**fields: Any) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(
    func: Callable[P, R] | None = None, /, **fields: Any
) -> JobFunction[P, R] | Callable[[Callable[P, R]], JobFunction[P, R]]:
    """Decorate a function so it carries a :class:`Job` template as ``.job``.

    Use as ``@job`` or ``@job(queue="emails", max_attempts=3)``.
    """

    def decorate(fn: Callable[P, R]) -> JobFunction[P, R]:
        return JobFunction(fn, Job.from_func(fn, **fields))

    if func is not None:
        return decorate(func)
    return decorate


def uuid7_ints(count: int) -> list[int]:
    """``count`` time-ordered UUIDv7 values as ints (a bulk push): one lock, one clock read
    and one read of randomness instead of one each, ordered and monotonic with
    :func:`uuid7`."""
    global _uuid_last_ms, _uuid_seq
    if count <= 0:
        return []
    noise = memoryview(os.urandom(8 * count)).cast("Q")
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _uuid_last_ms:
            _uuid_last_ms = ms
            _uuid_seq = (int.from_bytes(os.urandom(2)) & 0x3FF) - 1
        first_ms, first_seq = _uuid_last_ms, _uuid_seq + 1
        # The sequence counts on past 0xFFF into the millisecond field: a 12-bit overflow
        # carries into the next millisecond, as uuid7 does.
        end = (first_ms << 12) + first_seq + count
        _uuid_last_ms, _uuid_seq = (end - 1) >> 12, (end - 1) & 0xFFF
    fixed = (0x7 << 76) | (0b10 << 62)
    mask = (1 << 62) - 1
    start = (first_ms << 12) + first_seq
    return [
        ((tick >> 12) << 80) | ((tick & 0xFFF) << 64) | fixed | (bits & mask)
        for tick, bits in zip(range(start, start + count), noise, strict=True)
    ]


def uuid7_many(count: int) -> list[uuid.UUID]:
    """``count`` time-ordered UUIDs at once (see :func:`uuid7_ints`)."""
    return [uuid.UUID(int=value) for value in uuid7_ints(count)]


_new_object = object.__new__
_set_attribute = object.__setattr__
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown


def references_of(values: Iterable[int]) -> list[Reference]:
    """References for 128-bit ids given as ints (such as :func:`uuid7_ints` makes),
    built without re-checking each one: a bulk push makes thousands at once."""
    refs: list[Reference] = []
    append = refs.append
    for value in values:
        # What uuid.UUID(int=value) stores, for a value known to fit in 128 bits.
        job_id = _new_object(uuid.UUID)
        _set_attribute(job_id, "int", value)
        _set_attribute(job_id, "is_safe", _UNKNOWN_SAFETY)
        ref = _new_object(Reference)
        ref._id = job_id
        ref._hash = None
        append(ref)
    return refs
