"""A small rule language that renders parameterised SQL for plugins (pruner, reprioritize).

``(Age() > 3600) & (Queue() == "emails")`` becomes a ``psycopg.sql`` fragment with named
placeholders plus its parameters. Values are always parameters, never spliced into SQL.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from psycopg import sql

_counter = itertools.count()


class Condition:
    """A boolean SQL condition; combine with ``&`` and ``|``."""

    def __init__(self, template: sql.Composable, params: dict[str, Any]) -> None:
        self.template = template
        self.params = params

    def __and__(self, other: Condition) -> Condition:
        return self._join(other, "AND")

    def __or__(self, other: Condition) -> Condition:
        return self._join(other, "OR")

    def _join(self, other: Condition, op: str) -> Condition:
        if not isinstance(other, Condition):
            return NotImplemented
        template = sql.SQL("({} " + op + " {})").format(self.template, other.template)
        return Condition(template, {**self.params, **other.params})

    def to_sql(self) -> tuple[sql.Composable, dict[str, Any]]:
        """The SQL fragment and its parameters."""
        return self.template, self.params


class Field:
    """A column or expression that can be compared with values."""

    expression: sql.Composable = sql.SQL("NULL")

    def _compare(self, op: str, value: Any) -> Condition:
        name = f"rule_{next(_counter)}"
        template = sql.SQL("{} " + op + " {}").format(self.expression, sql.Placeholder(name))
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

    def in_(self, values: list[Any]) -> Condition:
        """The field equals one of ``values``."""
        name = f"rule_{next(_counter)}"
        template = sql.SQL("{} = ANY({})").format(self.expression, sql.Placeholder(name))
        return Condition(template, {name: [self._coerce(v) for v in values]})


class Age(Field):
    """Seconds since the job finished (or since it was created, if it has not)."""

    expression = sql.SQL("extract(epoch FROM now() - coalesce(completed_at, created_at))")

    def _coerce(self, value: Any) -> Any:
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
        return float(value)


class Queue(Field):
    """The job's queue name."""

    expression = sql.Identifier("queue")


class Job(Field):
    """The job's function path."""

    expression = sql.Identifier("func")


class State(Field):
    """The job's state."""

    expression = sql.Identifier("state")


class CreatedAt(Field):
    """When the job was pushed."""

    expression = sql.Identifier("created_at")


class ScheduledAt(Field):
    """When the job may run."""

    expression = sql.Identifier("scheduled_at")


class ID(Field):
    """The job id."""

    expression = sql.Identifier("id")


class Rules:
    """The fields usable in job rules, exposed by plugins as ``Plugin.Rules``."""

    Age = Age
    Queue = Queue
    Job = Job
    State = State
    CreatedAt = CreatedAt
    ScheduledAt = ScheduledAt
    ID = ID
