"""A small rule language that renders parameterised SQL for plugins (pruner, reprioritize).

``(Age() > 3600) & (Queue() == "emails")`` becomes a ``psycopg.sql`` fragment with named
placeholders plus its parameters. Values are always parameters, never spliced into SQL, and
string comparisons are plain equality (``%`` and ``_`` are literal characters, not LIKE
wildcards). Conditions combine with ``&`` (and), ``|`` (or) and ``~`` (not).

Bad values (a string for :class:`Age`, a naive datetime, an unknown state) raise
:class:`~chancy.errors.ConfigurationError` when the rule is built, not when it runs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import uuid
from collections.abc import Iterable
from typing import Any, NoReturn

from psycopg import sql

from chancy.errors import ConfigurationError
from chancy.job import QueuedJob, Reference

_counter = itertools.count()

#: Comparison operators and their mirror image (``a < b`` is ``b > a``).
_MIRRORED = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "=": "=", "<>": "<>"}


def _placeholder() -> tuple[str, sql.Placeholder]:
    name = f"rule_{next(_counter)}"
    return name, sql.Placeholder(name)


class Condition:
    """A boolean SQL condition; combine with ``&``, ``|`` and ``~``."""

    def __init__(self, template: sql.Composable, params: dict[str, Any]) -> None:
        self.template = template
        self.params = params

    def __and__(self, other: Condition) -> Condition:
        return self._join(other, "AND")

    def __or__(self, other: Condition) -> Condition:
        return self._join(other, "OR")

    def __invert__(self) -> Condition:
        # NULL-safe negation: a row whose condition is unknown (NULL) matches the negation.
        return Condition(sql.SQL("(({}) IS NOT TRUE)").format(self.template), dict(self.params))

    def _join(self, other: Condition, op: str) -> Condition:
        if not isinstance(other, Condition):
            return NotImplemented
        template = sql.SQL("({} " + op + " {})").format(self.template, other.template)
        return Condition(template, {**self.params, **other.params})

    def __bool__(self) -> NoReturn:
        # `a and b` / `a or b` would silently keep one side: demand & and | instead.
        raise ConfigurationError("combine rule conditions with & and |, not `and` / `or`")

    def to_sql(self) -> tuple[sql.Composable, dict[str, Any]]:
        """The SQL fragment and its parameters."""
        return self.template, self.params

    def __repr__(self) -> str:
        return f"Condition({self.template.as_string(None)!r}, {self.params!r})"


class Field:
    """A column or expression that can be compared with values."""

    expression: sql.Composable = sql.SQL("NULL")
    #: Whether ``<``/``>`` make sense for this field.
    ordered = True

    def _compare(self, op: str, value: Any) -> Condition:
        if op not in ("=", "<>") and not self.ordered:
            raise ConfigurationError(f"{type(self).__name__}() supports only == and !=")
        name, placeholder = _placeholder()
        template = sql.SQL("{} " + op + " {}").format(self.expression, placeholder)
        return Condition(template, {name: self._coerce(value)})

    def _coerce(self, value: Any) -> Any:
        return value

    def __gt__(self, value: Any) -> Condition:
        return self._compare(">", value)

    def __ge__(self, value: Any) -> Condition:
        return self._compare(">=", value)

    def __lt__(self, value: Any) -> Condition:
        return self._compare("<", value)

    def __le__(self, value: Any) -> Condition:
        return self._compare("<=", value)

    def __eq__(self, value: Any) -> Condition:  # type: ignore[override]
        return self._compare("=", value)

    def __ne__(self, value: Any) -> Condition:  # type: ignore[override]
        return self._compare("<>", value)

    def __hash__(self) -> int:
        return id(self)

    def in_(self, values: Iterable[Any]) -> Condition:
        """The field equals one of ``values``."""
        name, placeholder = _placeholder()
        items = self._coerce_many(values)
        template = sql.SQL("{} = ANY({})").format(self.expression, placeholder)
        return Condition(template, {name: items})

    def not_in(self, values: Iterable[Any]) -> Condition:
        """The field equals none of ``values``."""
        name, placeholder = _placeholder()
        items = self._coerce_many(values)
        template = sql.SQL("NOT ({} = ANY({}))").format(self.expression, placeholder)
        return Condition(template, {name: items})

    def _coerce_many(self, values: Iterable[Any]) -> list[Any]:
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise ConfigurationError(f"in_() needs a list of values, not {values!r}")
        return [self._coerce(v) for v in values]


class _TextField(Field):
    ordered = False

    def _coerce(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise ConfigurationError(f"{type(self).__name__}() compares with a str, not {value!r}")
        return value


class _TimeField(Field):
    def _coerce(self, value: Any) -> Any:
        if not isinstance(value, dt.datetime) or value.utcoffset() is None:
            raise ConfigurationError(
                f"{type(self).__name__}() compares with a timezone-aware datetime, not {value!r}"
            )
        return value


def _seconds(value: Any) -> float:
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"Age() compares with seconds or a timedelta, not {value!r}")
    return float(value)


class Age(Field):
    """Seconds since the job finished (or since it was created, if it has not finished).

    ``Age() > 3600`` renders as ``completed_at < now() - 3600 s`` (with the same bound on
    ``created_at`` for unfinished jobs) rather than as arithmetic over the columns, so an
    index on ``completed_at`` or ``created_at`` can serve it.
    """

    expression = sql.SQL("extract(epoch FROM now() - coalesce(completed_at, created_at))")

    def _compare(self, op: str, value: Any) -> Condition:
        name, placeholder = _placeholder()
        # Age op n  <=>  moment mirror(op) now() - n
        mirrored = sql.SQL(_MIRRORED[op])
        bound = sql.SQL("(now() - make_interval(secs => {}))").format(placeholder)
        template = sql.SQL(
            "(completed_at {op} {bound} OR (completed_at IS NULL AND created_at {op} {bound}))"
        ).format(op=mirrored, bound=bound)
        return Condition(template, {name: _seconds(value)})

    def in_(self, values: Iterable[Any]) -> Condition:
        raise ConfigurationError("Age() supports comparisons, not in_()")

    def not_in(self, values: Iterable[Any]) -> Condition:
        raise ConfigurationError("Age() supports comparisons, not not_in()")


class Queue(_TextField):
    """The job's queue name (exact match)."""

    expression = sql.Identifier("queue")


class Job(_TextField):
    """The job's function path (exact match)."""

    expression = sql.Identifier("func")


class State(_TextField):
    """The job's state (``pending``, ``running``, ``retrying``, ``succeeded``...)."""

    expression = sql.Identifier("state")

    def _coerce(self, value: Any) -> Any:
        try:
            return QueuedJob.State(value).value
        except ValueError:
            states = ", ".join(s.value for s in QueuedJob.State)
            raise ConfigurationError(f"unknown job state {value!r}: use one of {states}") from None


class CreatedAt(_TimeField):
    """When the job was pushed."""

    expression = sql.Identifier("created_at")


class ScheduledAt(_TimeField):
    """When the job may run."""

    expression = sql.Identifier("scheduled_at")


class ID(Field):
    """The job id (a :class:`~chancy.job.Reference`, UUID or its string)."""

    expression = sql.Identifier("id")

    def _coerce(self, value: Any) -> Any:
        if not isinstance(value, Reference | uuid.UUID | str):
            raise ConfigurationError(f"ID() compares with a job id, not {value!r}")
        try:
            return Reference(value).uuid
        except ValueError:
            raise ConfigurationError(f"ID() compares with a job id, not {value!r}") from None


class Rules:
    """The fields usable in job rules, exposed by plugins as ``Plugin.Rules``."""

    Age = Age
    Queue = Queue
    Job = Job
    State = State
    CreatedAt = CreatedAt
    ScheduledAt = ScheduledAt
    ID = ID
