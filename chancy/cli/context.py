"""What every command shares: loading the ``--app``, running async code, clean errors."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from chancy.app import Chancy
from chancy.errors import ChancyError

T = TypeVar("T")


def load_app(path: str) -> Chancy:
    """Import ``module:attribute`` and return the :class:`Chancy` it names.

    The attribute may be a Chancy instance or a zero-argument callable returning one.
    The current directory is importable, as with ``python -m``.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(f"expected module:attribute, not {path!r}", param_hint="--app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise click.BadParameter(
                f"cannot import module {module_name!r}", param_hint="--app"
            ) from None
        raise
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attribute!r}", param_hint="--app"
            ) from None
    if not isinstance(target, Chancy) and callable(target):
        target = target()
    if not isinstance(target, Chancy):
        raise click.BadParameter(
            f"{path} is {type(target).__name__}, not a Chancy instance", param_hint="--app"
        )
    return target


@dataclasses.dataclass
class CliState:
    """Per-invocation state stored on the click context (``ctx.obj``)."""

    app_path: str | None = None
    log_level: str | None = None
    _chancy: Chancy | None = None

    def chancy(self) -> Chancy:
        """The application named by ``--app`` (imported on first use)."""
        if self._chancy is None:
            if not self.app_path:
                raise click.UsageError("this command needs --app module:attribute (or CHANCY_APP)")
            self._chancy = load_app(self.app_path)
        return self._chancy

    def configure_logging(self, default: str = "WARNING") -> None:
        """Send log records to stderr at ``--log-level`` (or ``default``), unless the
        host program (an embedding app, a test runner) has configured logging already."""
        level = (self.log_level or default).upper()
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


pass_state = click.make_pass_decorator(CliState, ensure=True)


def run_with_app(state: CliState, func: Callable[[Chancy], Awaitable[T]]) -> T:
    """Open the app's async pool, run ``func(chancy)`` to completion and close the pool."""
    chancy = state.chancy()

    async def main() -> T:
        await check_connection(chancy)
        async with chancy:
            return await func(chancy)

    return asyncio.run(main())


async def check_connection(chancy: Chancy, timeout: int = 10) -> None:
    """Connect once, so that a wrong DSN or a down server fails at once with the driver's
    message (the pool would retry quietly for its whole timeout)."""
    conn = await psycopg.AsyncConnection.connect(chancy.dsn, connect_timeout=timeout)
    await conn.close()


def one_line(message: object) -> str:
    """Collapse whitespace so an error message prints as a single line."""
    return " ".join(str(message).split())


def translate_errors(func: Callable[[], T]) -> T:
    """Run ``func``; show Chancy and connection errors as a one-line message, exit 1."""
    try:
        return func()
    except ChancyError as exc:
        raise click.ClickException(one_line(exc) or type(exc).__name__) from None
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"database unavailable: {one_line(exc)}") from None


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` to stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(code)


def to_json(value: Any) -> str:
    """Pretty JSON for the terminal; datetimes, references and enums become strings."""
    return json.dumps(value, indent=2, default=_json_default, sort_keys=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return str(value)


def parse_datetime(value: str, param_hint: str) -> dt.datetime:
    """Parse an ISO 8601 timestamp; a naive one is taken as local time."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 timestamp", param_hint=param_hint
        ) from None
    return parsed if parsed.utcoffset() is not None else parsed.astimezone()


def parse_json_object(value: str | None, param_hint: str) -> dict[str, Any]:
    """Parse a JSON object given on the command line."""
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"invalid JSON: {exc}", param_hint=param_hint) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=param_hint)
    return parsed
