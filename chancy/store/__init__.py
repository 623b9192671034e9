"""The store: the only layer that knows SQL.

Each operation is written once as a generator that yields ``(query, params)`` and receives
the rows; :func:`arun` drives it on an async connection and :func:`run` on a sync one, so
the sync API is a thin twin of the async one running the same statements.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib.resources
import itertools
import json
import re
import string
import typing
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from chancy.errors import (
    ConfigurationError,
    InvalidNameError,
    JobArgumentsError,
    UnknownQueueError,
)
from chancy.job import (
    Job,
    Limit,
    QueuedJob,
    Reference,
    references_of,
    uuid7,
    uuid7_ints,
    uuid7_many,
)
from chancy.queue import Queue

T = TypeVar("T")
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class CopyRows:
    """Statement "parameters" that make the drivers run the statement as ``COPY ... FROM
    STDIN`` and stream these rows (text format) into it."""

    rows: Sequence[Sequence[Any]] = ()
    #: Rows already in COPY text format (tab-separated, newline-terminated), sent as is.
    text: str = ""
    #: Like ``text``, produced lazily piece by piece while the earlier pieces are sent,
    #: so that the server stores rows while the client formats the next ones. An
    #: exception from the iterator aborts the COPY.
    chunks: Iterable[str] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class TupleRows:
    """Statement parameters whose result rows the drivers hand back as tuples, in column
    order, instead of dicts: for hot statements read by position."""

    params: Params


_COPY_NULL = "\\N"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """``value`` escaped for a COPY text-format field."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


Statement = tuple[sql.Composed | sql.SQL, Params | CopyRows | TupleRows | None]
Row = dict[str, Any]
#: A store operation: yields statements, receives each statement's rows, returns a value.
#: Rows are dicts, or tuples for a statement whose parameters are :class:`TupleRows`.
Op = Generator[Statement, list[Any], T]

#: Batches of at least this many jobs without unique keys are pushed with COPY.
COPY_MIN_JOBS = 100
PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,29}$")
_HEADER_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can prefix table names, else raise :class:`InvalidNameError`."""
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise InvalidNameError(
            f"invalid table prefix {prefix!r}: use 1-30 of [a-z0-9_], not starting with a digit"
        )
    return prefix


@functools.cache
def _query_texts() -> dict[str, str]:
    texts: dict[str, str] = {}
    folder = importlib.resources.files("chancy.store") / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _HEADER_RE.split(entry.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in texts:
                raise RuntimeError(f"duplicate query name {name}")
            texts[name] = body.strip()
    return texts


def compose(text: str, prefix: str, **slots: sql.Composable) -> sql.Composed:
    """Compose SQL text: ``{name}`` becomes the identifier ``prefix + name`` unless a slot
    of that name is given. Literal braces in the text are written ``{{`` and ``}}``."""
    names = {field for _, field, _, _ in string.Formatter().parse(text) if field}
    args: dict[str, sql.Composable] = {
        name: slots[name] if name in slots else sql.Identifier(prefix + name) for name in names
    }
    return sql.SQL(text).format(**args)


class _Rendered(sql.Composed):
    """A composed query whose bytes are computed once. psycopg renders a ``Composed``
    on every execute (joining its parts, quoting its identifiers), which was a tenth of
    a single push's client time. Only ASCII text is kept rendered: its bytes are the
    same in every client encoding (the named queries and validated prefixes are ASCII)."""

    def __init__(self, composed: sql.Composed) -> None:
        super().__init__(list(composed))
        rendered = composed.as_bytes(None)
        self._rendered = rendered if rendered.isascii() else None

    def as_bytes(self, context: Any = None) -> bytes:
        if self._rendered is not None:
            return self._rendered
        return super().as_bytes(context)


#: A JSON \u0000 escape that is not itself an escaped backslash followed by "u0000".
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


#: Encodes a value as JSON text (str or UTF-8 bytes); raises TypeError/ValueError when
#: it cannot.
JsonDumps = Callable[[Any], "str | bytes"]
#: Decodes JSON text.
JsonLoads = Callable[["str | bytes"], Any]


_orjson: Any
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is optional
    _orjson = None


def _stdlib_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _orjson_dumps(value: Any) -> str:
    import orjson

    # Datetimes and dataclasses are refused as the standard library refuses them, so a
    # job never receives a string where its caller passed an object; non-str keys become
    # strings as the standard library makes them.
    options = (
        orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS
    )
    encoded: str = orjson.dumps(value, option=options).decode()
    # orjson writes NaN and infinities as null; stdlib json refuses them, which is what
    # lets a bad value fail at push. Only output that contains a null can hide one.
    if "null" in encoded:
        json.dumps(value, allow_nan=False, default=lambda _: None)
    return encoded


def _orjson_loads(text: str | bytes) -> Any:
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # jsonb holds numbers orjson refuses (beyond 64-bit integers); a row written by
        # another client must never make a fetch fail.
        return json.loads(text)


def default_json() -> tuple[JsonDumps, JsonLoads]:
    """orjson's dumps/loads when it is installed (``pip install chancy[orjson]``), else
    the standard library's."""
    try:
        import orjson  # noqa: F401
    except ImportError:
        return _stdlib_dumps, json.loads
    return _orjson_dumps, _orjson_loads


def _as_text(encoded: str | bytes) -> str:
    return encoded.decode() if isinstance(encoded, bytes | bytearray) else encoded


#: Largest accepted JSON encoding of a job's kwargs (or meta), in bytes.
MAX_PAYLOAD_BYTES = 1024 * 1024
#: Deepest accepted nesting of lists and dicts in kwargs (or meta).
MAX_PAYLOAD_DEPTH = 100
_INT64 = 2**63


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a string with a NUL character, which jsonb cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a string with a lone surrogate, which is not valid Unicode"
    return None


def _payload_problem(value: Any, root: str) -> tuple[str, str] | None:
    """The first value JSON (or jsonb, or a consumer reading int64) cannot hold faithfully,
    as (path, reason), e.g. ``("kwargs['a'][3]", "a set")``; None if all is well. Walks
    iteratively, so deep nesting cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            reason = _string_problem(item)
            if reason is not None:
                return path, reason
        elif isinstance(item, int):
            if not -_INT64 <= item < _INT64:
                return path, "an integer outside the signed 64-bit range"
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                return path, f"{item!r}, which JSON cannot represent"
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_PAYLOAD_DEPTH:
                return path, f"nested deeper than {MAX_PAYLOAD_DEPTH} levels"
            if isinstance(item, dict):
                children = []
                for key, child in item.items():
                    if not isinstance(key, str):
                        return (
                            f"{path}[{key!r}]",
                            f"a key of type {type(key).__name__} (keys must be str)",
                        )
                    reason = _string_problem(key)
                    if reason is not None:
                        return f"{path}[{key!r}]", f"a key that is {reason}"
                    children.append((child, f"{path}[{key!r}]", depth + 1))
                stack.extend(reversed(children))
            else:
                stack.extend(
                    (item[i], f"{path}[{i}]", depth + 1) for i in range(len(item) - 1, -1, -1)
                )
        else:
            return (
                path,
                f"a {type(item).__name__}, which is not JSON "
                "(use str, int, float, bool, None, list or dict)",
            )
    return None


def dumps(value: Any, what: str, encoder: JsonDumps = _stdlib_dumps) -> str:
    """Encode ``value`` as JSON, or raise :class:`JobArgumentsError` naming ``what`` and
    the path of the offending value (``kwargs['a'][3]``). With the default encoders every
    value is checked first; a custom ``json_dumps`` decides for itself what it encodes."""
    root = what.split(" ", 1)[0]
    if encoder is _stdlib_dumps or encoder is _orjson_dumps:
        problem = _payload_problem(value, root)
        if problem is not None:
            path, reason = problem
            raise JobArgumentsError(f"{what}: {path} is {reason}", path=path)
    try:
        encoded = _as_text(encoder(value))
    except (TypeError, ValueError) as exc:
        raise JobArgumentsError(f"{what} must be JSON-serialisable: {exc}", path=root) from None
    if "\\u0000" in encoded and _JSON_NUL.search(encoded):
        raise JobArgumentsError(
            f"{what} contains a NUL character, which jsonb cannot store", path=root
        )
    if len(encoded) > MAX_PAYLOAD_BYTES and len(encoded.encode()) > MAX_PAYLOAD_BYTES:
        raise JobArgumentsError(
            f"{what}: {root} is {len(encoded.encode())} bytes as JSON, over the "
            f"{MAX_PAYLOAD_BYTES}-byte limit; store large data elsewhere and pass a key",
            path=root,
        )
    return encoded


def _plain_str(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain(value: Any, depth: int = 0) -> bool:
    """True if ``value`` is built only of exact JSON types that :func:`_payload_problem`
    accepts; False means "look closer" (it may still be fine). Builds no paths, so the
    common case costs a fraction of the full walk."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_PAYLOAD_DEPTH:
            return False
        for key, item in value.items():
            if type(key) is not str or not _plain_str(key):
                return False
            kind = type(item)
            if kind is str:
                if not _plain_str(item):
                    return False
            elif kind is int:
                if not -_INT64 <= item < _INT64:
                    return False
            elif item is not None and kind is not bool and not _plain(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        if depth >= MAX_PAYLOAD_DEPTH:
            return False
        return all(_plain(item, depth + 1) for item in value)
    if kind is str:
        return _plain_str(value)
    if kind is int:
        return bool(-_INT64 <= value < _INT64)
    if kind is float:
        return bool(value - value == 0.0)  # NaN and infinities give NaN
    return value is None or kind is bool


def _encode_plain(value: Any, encoder: JsonDumps) -> str | None:
    """``value`` as JSON if a built-in encoder can take the fast path, else None."""
    if (encoder is not _orjson_dumps and encoder is not _stdlib_dumps) or not _plain(value):
        return None
    try:
        if encoder is _orjson_dumps and _orjson is not None:
            encoded: str = _orjson.dumps(value).decode()
        else:
            encoded = _stdlib_dumps(value)
    except (TypeError, ValueError):
        return None
    if len(encoded) > MAX_PAYLOAD_BYTES // 4 and len(encoded.encode()) > MAX_PAYLOAD_BYTES:
        return None
    return encoded


def _without_nul(encoded: str) -> str:
    # Job output is not the caller's to fix: NUL (jsonb cannot store it) becomes U+FFFD.
    if "\\u0000" not in encoded:
        return encoded
    return _JSON_NUL.sub(lambda m: m.group(1) + "\\ufffd", encoded)


@dataclasses.dataclass(frozen=True, slots=True)
class PushResult:
    """What a push did for one job: its reference and whether it was newly inserted."""

    reference: Reference
    inserted: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """What one fetch claimed; ``rate_limited_for`` is set when the queue's rate window is
    spent: the seconds until the next window opens (fetching sooner claims nothing)."""

    jobs: list[QueuedJob]
    rate_limited_for: float | None = None


@dataclasses.dataclass(slots=True)
class Outcome:
    """How one claimed job ended, as recorded by :meth:`Store.complete_jobs`."""

    job: QueuedJob
    state: str
    delay: float = 0.0
    refund: bool = False
    error: str | None = None
    meta: Mapping[str, Any] | None = None
    result: Any = None
    #: Import paths of the exception that ended the run, most specific first.
    exception: list[str] | None = None
    #: The latest progress the job reported, written with the outcome.
    progress: Mapping[str, Any] | None = None
    #: ``result`` as JSON, when the worker has encoded it already.
    encoded_result: str | None = None


#: Rows per piece of a streamed COPY: big enough to amortise a write, small enough that
#: the server starts storing while the client formats.
_COPY_CHUNK_ROWS = 256
_UTC = dt.UTC


def _has_defaults(job: Job) -> bool:
    """Whether the columns after kwargs would all get their defaults (the common case,
    which ``perf_push_copy_jobs_plain`` serves with fewer columns for the server)."""
    return not (
        job.meta
        or job.limits
        or job.priority
        or job.max_attempts != 1
        or job.concurrency_key is not None
        or job.scheduled_at is not None
    )


class _CopyRows:
    """Formats jobs as COPY rows (text format) and remembers what the push must return
    or announce: the references in order, each queue's earliest due time (None: due
    now), and the jobs with a ``unique_key``, which a COPY cannot deduplicate (their
    rows are left out; they keep a slot and an id).

    Rows are ``plain`` (id, queue, func, kwargs: ``perf_push_copy_jobs_plain``) while
    every job has default values in the other columns, else full
    (``perf_push_copy_jobs``). :meth:`format` stops at the first job a plain COPY
    cannot hold; the next call, full, goes on from there."""

    def __init__(self, store: Store, jobs: Iterable[Job], *, plain: bool) -> None:
        self.store = store
        self.plain = plain
        self.refs: list[Reference] = []
        self.first_due: dict[str, dt.datetime | None] = {}
        self.deferred: list[tuple[int, Job]] = []
        self.done = False
        self._jobs = iter(jobs)
        #: The job (and id) that ended a plain COPY: the next, full one starts with it.
        self._carried: tuple[Job, int] | None = None
        self._fast = _orjson is not None and store.json_dumps is _orjson_dumps
        # The built-in encoders write compact JSON: a backslash is all COPY must escape.
        self._compact = store.json_dumps is _orjson_dumps or store.json_dumps is _stdlib_dumps
        self._names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        text = self._names.get(name)
        if text is None:
            text = self._names[name] = copy_text(name)
        return text

    def _json(self, value: Any, root: str, func: str) -> str:
        if self._fast and type(value) is dict and _plain(value):
            encoded: str = _orjson.dumps(value).decode()
            if len(encoded) > MAX_PAYLOAD_BYTES // 4:
                encoded = self.store.encode_input(value, root, func)
        else:
            encoded = self.store.encode_input(value, root, func)
        if self._compact:
            return encoded.replace("\\", "\\\\") if "\\" in encoded else encoded
        return copy_text(encoded)

    @property
    def queues(self) -> set[str]:
        """Every queue the jobs read so far go to."""
        return {*self.first_due, *(job.queue for _, job in self.deferred)}

    def _full_row(self, job: Job, value: int) -> str:
        queue = job.queue
        func = job.func
        when = job.scheduled_at
        if when is None:
            # 'now' reads as the transaction's start: what the column default gives.
            scheduled = "now"
            self.first_due[queue] = None
        else:
            scheduled = when.astimezone(_UTC).isoformat()
            earliest = self.first_due.get(queue, when)
            if queue not in self.first_due or (earliest is not None and when < earliest):
                self.first_due[queue] = when
        key = job.concurrency_key
        return (
            f"{value:032x}\t{self._name(queue)}\t{self._name(func)}\t"
            f"{self._json(job.kwargs, 'kwargs', func)}\t"
            f"{self._json(job.meta, 'meta', func) if job.meta else '{}'}\t"
            f"{_limits_json(job.limits) if job.limits else '[]'}\t"
            f"{int(job.priority)}\t{int(job.max_attempts)}\t"
            f"{_COPY_NULL if key is None else copy_text(key)}\t{scheduled}\n"
        )

    def format(self, chunk_rows: int) -> Iterator[str]:
        """Rows of the next jobs, up to ``chunk_rows`` per yielded piece, in this COPY's
        shape; sets :attr:`done` once every job is read. Jobs are read one at a time and
        dropped once formatted, so a batch never holds them all."""
        refs = self.refs
        first_due = self.first_due
        name = self._name
        slow_json = self._json
        fast = self._fast
        plain = self.plain
        lines: list[str] = []
        # Consecutive jobs mostly share queue and function: their COPY text is reused.
        last_queue: str | None = None
        last_func: str | None = None
        names = ""
        if self._carried is not None:
            job, value = self._carried
            self._carried = None
            lines.append(self._full_row(job, value))
        while True:
            first = next(self._jobs, None)
            if first is None:
                self.done = True
                if lines:
                    yield "".join(lines)
                return
            # Ids for a whole piece at once; those a last, short piece leaves are skipped.
            ids = uuid7_ints(chunk_rows)
            used = 0
            for job in itertools.chain((first,), itertools.islice(self._jobs, chunk_rows - 1)):
                value = ids[used]
                used += 1
                if job.unique_key is not None:
                    self.deferred.append((len(refs) + used - 1, job))
                    continue
                if not plain:
                    lines.append(self._full_row(job, value))
                    continue
                if (
                    job.meta
                    or job.limits
                    or job.priority
                    or job.max_attempts != 1
                    or job.concurrency_key is not None
                    or job.scheduled_at is not None
                ):  # not _has_defaults(job), inlined: this loop runs once a job
                    # The first job a plain COPY cannot hold opens the next, full one.
                    self._carried = (job, value)
                    self.plain = False
                    refs.extend(references_of(ids[:used]))
                    if lines:
                        yield "".join(lines)
                    return
                func = job.func
                kwargs = job.kwargs
                if fast and type(kwargs) is dict and _plain(kwargs):
                    encoded: str = _orjson.dumps(kwargs).decode()
                    if len(encoded) > MAX_PAYLOAD_BYTES // 4:
                        encoded = slow_json(kwargs, "kwargs", func)
                    elif "\\" in encoded:
                        encoded = encoded.replace("\\", "\\\\")
                else:
                    encoded = slow_json(kwargs, "kwargs", func)
                queue = job.queue
                if queue is not last_queue or func is not last_func:
                    first_due[queue] = None
                    last_queue, last_func = queue, func
                    names = f"\t{name(queue)}\t{name(func)}\t"
                lines.append(f"{value:032x}{names}{encoded}\n")
            refs.extend(references_of(ids[:used]))
            if used < chunk_rows:
                self.done = True
                if lines:
                    yield "".join(lines)
                return
            if lines:
                yield "".join(lines)
                lines = []


def _limits_json(limits: Sequence[Limit]) -> str:
    return json.dumps([limit.to_dict() for limit in limits])


class Store:
    """Composes every named query once for a table prefix and offers typed operations."""

    def __init__(
        self,
        prefix: str = "chancy_",
        *,
        json_dumps: JsonDumps | None = None,
        notify_completions: bool = True,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.channel = prefix + "events"
        #: Completions are announced here (one NOTIFY per batch) for result waiters.
        self.done_channel = prefix + "done"
        self.notify_completions = notify_completions
        self.json_dumps: JsonDumps = json_dumps or default_json()[0]
        self._composed: dict[str, sql.Composed] = {}

    def dumps(self, value: Any, what: str) -> str:
        """Encode job input as JSON, or raise :class:`JobArgumentsError` naming ``what``."""
        return dumps(value, what, self.json_dumps)

    def encode_input(self, value: Any, root: str, func: str) -> str:
        """:meth:`dumps` of a job's ``kwargs`` or ``meta`` (``root``): the same result and
        the same errors, with a fast path for payloads of plain JSON types."""
        encoded = _encode_plain(value, self.json_dumps)
        if encoded is None:
            encoded = dumps(value, f"{root} of {func}", self.json_dumps)
        return encoded

    def dumps_lenient(self, value: Any) -> str:
        """JSON for a job's output (result, meta, error): what the encoder cannot hold
        is kept as its repr, and NUL characters are replaced."""
        try:
            encoded = _as_text(self.json_dumps(value))
        except (TypeError, ValueError):
            return _dumps_lenient(value)
        return _without_nul(encoded)

    def q(self, name: str) -> sql.Composed:
        """The composed query ``name`` (cached, and rendered once)."""
        query = self._composed.get(name)
        if query is None:
            query = _Rendered(compose(_query_texts()[name], self.prefix))
            self._composed[name] = query
        return query

    def table(self, name: str) -> sql.Identifier:
        """The identifier of table ``name`` under this prefix."""
        return sql.Identifier(self.prefix + name)

    # -- migrations -------------------------------------------------------------------

    def migrate(self, key: str, package: str, to_version: int | None = None) -> Op[list[int]]:
        """Bring migration set ``key`` (``.sql`` files in ``package``) to ``to_version``
        (latest if None) in one transaction; returns the versions applied (negative = down)."""
        steps = migration_steps(package)
        target = max(steps, default=0) if to_version is None else to_version
        if target < 0 or (target and target not in steps):
            raise ConfigurationError(f"no migration {target} for {key} (latest: {max(steps)})")
        yield self.q("lock_migrations_xact"), {"lock_name": self.prefix + "migrate"}
        yield self.q("create_versions_table"), None
        rows = yield self.q("select_version_one"), {"key": key}
        current = rows[0]["version"] if rows else 0
        applied: list[int] = []
        if target > current:
            for version in sorted(v for v in steps if current < v <= target):
                yield compose(steps[version][0], self.prefix), None
                applied.append(version)
        elif target < current:
            for version in sorted((v for v in steps if target < v <= current), reverse=True):
                yield compose(steps[version][1], self.prefix), None
                applied.append(-version)
        if applied:
            yield self.q("set_version_one"), {"key": key, "version": target}
        return applied

    def migration_state(self, key: str, package: str) -> Op[tuple[int, int]]:
        """(current, latest) versions of migration set ``key``."""
        latest = max(migration_steps(package), default=0)
        rows = yield self.q("versions_table_exists"), {"table": self._qualified("versions")}
        if not rows[0]["exists"]:
            return 0, latest
        rows = yield self.q("select_version_one"), {"key": key}
        return (rows[0]["version"] if rows else 0), latest

    def _qualified(self, name: str) -> str:
        # to_regclass wants a quoted name; the prefix is validated to [a-z0-9_].
        return f'"{self.prefix}{name}"'

    # -- jobs -------------------------------------------------------------------------

    def push_jobs(
        self, jobs: Sequence[Job], *, require_queues: bool, notify: bool
    ) -> Op[list[PushResult] | list[str]]:
        """Insert jobs in one statement. Returns one PushResult per job, or the names of
        unknown queues (and inserts nothing) when ``require_queues`` is set."""
        if len(jobs) == 1:
            return (yield from self._push_one(jobs[0], require_queues, notify))
        if len(jobs) >= COPY_MIN_JOBS and all(job.unique_key is None for job in jobs):
            return (yield from self._push_copy(jobs, require_queues, notify))
        return (
            yield from self._push_array(
                jobs, uuid7_many(len(jobs)), require_queues=require_queues, notify=notify
            )
        )

    def _push_array(
        self,
        jobs: Sequence[Job],
        ids: Sequence[uuid.UUID],
        *,
        require_queues: bool,
        notify: bool,
    ) -> Op[list[PushResult] | list[str]]:
        """push_jobs_many: one statement, any fields, ``unique_key`` deduplication."""
        columns: dict[str, list[Any]] = {
            k: []
            for k in (
                "id",
                "queue",
                "func",
                "kwargs",
                "meta",
                "limits",
                "priority",
                "max_attempts",
                "unique_key",
                "scheduled_at",
                "concurrency_key",
            )
        }
        # Jobs sharing a unique key within one batch collapse onto the first of them.
        # Rows go in unique-key order, so two batches sharing keys cannot deadlock; ids
        # (and so FIFO order) are still given in the caller's order.
        first_with_key: dict[str, int] = {}
        slot_of_job: list[int] = []
        order = sorted(
            range(len(jobs)), key=lambda i: (jobs[i].unique_key is None, jobs[i].unique_key or "")
        )
        position = {index: rank for rank, index in enumerate(order)}
        jobs = [jobs[i] for i in order]
        ids = [ids[i] for i in order]
        for job, job_id in zip(jobs, ids, strict=True):
            if job.unique_key is not None and job.unique_key in first_with_key:
                slot_of_job.append(first_with_key[job.unique_key])
                continue
            if job.unique_key is not None:
                first_with_key[job.unique_key] = len(columns["id"])
            slot_of_job.append(len(columns["id"]))
            columns["id"].append(job_id)
            columns["queue"].append(job.queue)
            columns["func"].append(job.func)
            columns["kwargs"].append(self.encode_input(job.kwargs, "kwargs", job.func))
            columns["meta"].append(self.encode_input(job.meta, "meta", job.func))
            columns["limits"].append(json.dumps([limit.to_dict() for limit in job.limits]))
            columns["priority"].append(job.priority)
            columns["max_attempts"].append(job.max_attempts)
            columns["unique_key"].append(job.unique_key)
            columns["scheduled_at"].append(job.scheduled_at)
            columns["concurrency_key"].append(job.concurrency_key)
        if not jobs:
            return []
        params = {
            **columns,
            "require_queues": require_queues,
            "notify": notify,
            "channel": self.channel,
        }
        rows = yield self.q("push_jobs_many"), params
        missing = [r["missing_queue"] for r in rows if r["missing_queue"] is not None]
        if missing:
            return sorted(missing)
        by_id = {r["id"]: r for r in rows if r["id"] is not None}
        by_key = {r["unique_key"]: r for r in by_id.values() if r["unique_key"] is not None}
        slots: list[PushResult] = []
        for index, job_id in enumerate(columns["id"]):
            key = columns["unique_key"][index]
            row = by_id.get(job_id) or (by_key.get(key) if key is not None else None)
            if row is None:  # pragma: no cover - the statement returns a row per input row
                raise RuntimeError("push returned no row for a job")
            slots.append(PushResult(Reference(row["id"]), bool(row["inserted"])))
        results = []
        seen: set[int] = set()
        for slot in slot_of_job:
            result = slots[slot]
            if slot in seen:
                result = PushResult(result.reference, False)
            seen.add(slot)
            results.append(result)
        return [results[position[i]] for i in range(len(results))]

    def _push_copy(
        self, jobs: Sequence[Job], require_queues: bool, notify: bool
    ) -> Op[list[PushResult] | list[str]]:
        """Many jobs without unique keys: COPY them in (no dedup to resolve, so every job
        is inserted under the id made here). Every row is encoded before any SQL runs.
        Several statements: run it in a transaction (push_many does) for all-or-nothing."""
        rows = _CopyRows(self, jobs, plain=all(_has_defaults(job) for job in jobs))
        text = "".join(rows.format(len(jobs)))
        queues = sorted(rows.queues)
        if require_queues:
            missing = yield self.q("perf_push_missing_queues"), {"queue": queues}
            if missing:
                return sorted(r["missing_queue"] for r in missing)
        yield self._copy_statement(rows.plain), CopyRows(text=text)
        if notify:
            yield from self._notify_pushed(rows.first_due)
        return [PushResult(ref, True) for ref in rows.refs]

    def push_jobs_streamed(
        self, jobs: Iterable[Job], *, require_queues: bool, notify: bool
    ) -> Op[list[Reference]]:
        """One batch of :meth:`Chancy.push_many`: the jobs are read, checked, encoded and
        streamed into a COPY piece by piece, so the server stores rows while the next
        ones are made. Jobs with a ``unique_key`` keep their place (and id) and go in
        after the COPY through the deduplicating statement. Returns the references in
        the caller's order. Raises part way (bad input, unknown queue) after SQL ran:
        run it in a transaction of its own, which the error rolls back."""
        stream = iter(jobs)
        head = list(itertools.islice(stream, COPY_MIN_JOBS))
        if len(head) < COPY_MIN_JOBS:
            results = yield from self.push_jobs(head, require_queues=require_queues, notify=notify)
            if results and isinstance(results[0], str):
                raise UnknownQueueError([str(name) for name in results])
            return [r.reference for r in typing.cast(list[PushResult], results)]
        rows = _CopyRows(
            self,
            itertools.chain(head, stream),
            plain=all(_has_defaults(job) for job in head),
        )
        while not rows.done:
            statement = self._copy_statement(rows.plain)
            yield statement, CopyRows(chunks=rows.format(_COPY_CHUNK_ROWS))
        refs = rows.refs
        if rows.deferred:
            slots = [slot for slot, _ in rows.deferred]
            keyed = [job for _, job in rows.deferred]
            results = yield from self._push_array(
                keyed, [refs[slot].uuid for slot in slots], require_queues=False, notify=notify
            )
            for slot, result in zip(slots, typing.cast(list[PushResult], results), strict=True):
                refs[slot] = result.reference
        # The queue check comes last, with the NOTIFY: an unknown queue raises, and the
        # rollback takes back the rows and the notification alike.
        due = sorted(rows.first_due) if notify else []
        missing = yield (
            self.q("perf_push_streamed_check_notify"),
            {
                "queue": sorted(rows.queues) if require_queues else [],
                "channel": self.channel,
                "due_queue": due,
                "first_due": [rows.first_due[q] for q in due],
            },
        )
        if missing:
            raise UnknownQueueError(sorted(r["missing_queue"] for r in missing))
        return refs

    def _copy_statement(self, plain: bool) -> sql.Composed:
        return self.q("perf_push_copy_jobs_plain" if plain else "perf_push_copy_jobs")

    def _notify_pushed(self, first_due: Mapping[str, dt.datetime | None]) -> Op[None]:
        queues = sorted(first_due)
        yield (
            self.q("perf_push_notify"),
            {
                "channel": self.channel,
                "queue": queues,
                "first_due": [first_due[q] for q in queues],
            },
        )

    def _push_one(
        self, job: Job, require_queues: bool, notify: bool
    ) -> Op[list[PushResult] | list[str]]:
        params = {
            "id": uuid7(),
            "queue": job.queue,
            "func": job.func,
            "kwargs": self.encode_input(job.kwargs, "kwargs", job.func),
            "meta": self.encode_input(job.meta, "meta", job.func) if job.meta else "{}",
            "limits": json.dumps([limit.to_dict() for limit in job.limits]) if job.limits else "[]",
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            "unique_key": job.unique_key,
            "scheduled_at": job.scheduled_at,
            "concurrency_key": job.concurrency_key,
            "require_queues": require_queues,
            "notify": notify,
            "channel": self.channel,
        }
        query = "push_job_one" if job.unique_key is not None else "perf_push_job_one_plain"
        rows = yield self.q(query), params
        if not rows:
            return [job.queue]
        return [PushResult(Reference(rows[0]["id"]), bool(rows[0]["inserted"]))]

    def fetch_jobs(self, queue: str, worker_id: str, limit: int) -> Op[list[QueuedJob]]:
        """Claim up to ``limit`` due jobs of ``queue``: highest priority first, then the
        longest due (``scheduled_at``), then the oldest (see :meth:`claim_jobs`)."""
        claim = yield from self.claim_jobs(queue, worker_id, limit)
        return claim.jobs

    def claim_jobs(self, queue: str, worker_id: str, limit: int) -> Op[Claim]:
        """Claim up to ``limit`` due jobs of ``queue`` within its rate limit and
        concurrency-key limit, in fetch order; says when a spent rate window reopens."""
        rows: list[Any] = yield (
            self.q("fetch_jobs_many"),
            TupleRows({"queue": queue, "worker_id": worker_id, "limit": limit}),
        )
        retry_in: float | None = None
        jobs = []
        for row in rows:
            if row[0] is None:
                retry_in = row[16]
            else:
                jobs.append(_claimed_job(row))
        jobs.sort(key=lambda j: (-j.priority, j.scheduled_at, j.id.uuid))
        return Claim(jobs, retry_in)

    def complete_jobs(
        self, worker_id: str, outcomes: Sequence[Outcome], *, held: bool = True
    ) -> Op[set[Reference]]:
        """Record outcomes in one statement; returns the jobs whose claim still held
        (always empty with ``held=False``, which saves reading them back). The
        statement also sends one NOTIFY on :attr:`done_channel` for the batch."""
        if not outcomes:
            return set()
        lenient = self.dumps_lenient
        # The usual batch is all successes without meta changes, results or progress:
        # those columns go as one NULL each (the statement's unnest pads them) instead
        # of arrays of NULLs that psycopg would dump element by element.
        plain = all(
            o.error is None
            and o.meta is None
            and o.result is None
            and o.encoded_result is None
            and o.progress is None
            and not o.refund
            and not o.delay
            for o in outcomes
        )
        params: dict[str, Any] = {
            "worker_id": worker_id,
            "id": [o.job.id.uuid for o in outcomes],
            "attempt": [o.job.attempts for o in outcomes],
            "state": [o.state for o in outcomes],
            "started_at": [o.job.started_at for o in outcomes],
            "notify": self.notify_completions,
            "channel": self.done_channel,
            "held": held,
        }
        if plain:
            for column in ("delay", "refund", "error", "meta", "result", "progress"):
                params[column] = None
        else:
            params.update(
                delay=[_safe_delay(o.delay) for o in outcomes],
                refund=[1 if o.refund else 0 for o in outcomes],
                error=[
                    None
                    if o.error is None
                    else lenient({"attempt": o.job.attempts, "traceback": o.error})
                    for o in outcomes
                ],
                meta=[None if o.meta is None else lenient(o.meta) for o in outcomes],
                result=[
                    o.encoded_result
                    if o.encoded_result is not None
                    else (None if o.result is None else lenient(o.result))
                    for o in outcomes
                ],
                progress=[None if o.progress is None else lenient(o.progress) for o in outcomes],
            )
        rows = yield self.q("complete_jobs_batch"), params
        return {Reference(r["id"]) for r in rows if r["id"] is not None}

    def update_progress(
        self, worker_id: str, updates: Sequence[tuple[QueuedJob, Mapping[str, Any]]]
    ) -> Op[set[Reference]]:
        """Write running jobs' progress in one claim-guarded statement; returns the jobs
        whose claim still held."""
        if not updates:
            return set()
        rows = yield (
            self.q("jobs_update_progress_many"),
            {
                "worker_id": worker_id,
                "id": [job.id.uuid for job, _ in updates],
                "attempt": [job.attempts for job, _ in updates],
                "started_at": [job.started_at for job, _ in updates],
                "progress": [self.dumps_lenient(progress) for _, progress in updates],
            },
        )
        return {Reference(r["id"]) for r in rows}

    def get_jobs(self, refs: Iterable[Reference | str | uuid.UUID]) -> Op[list[QueuedJob]]:
        """The stored jobs among ``refs`` (missing ones are left out)."""
        ids = [Reference(r).uuid for r in refs]
        rows = yield self.q("select_jobs_many"), {"ids": ids}
        return [row_to_job(r) for r in rows]

    def cancel_job(self, ref: Reference, *, notify: bool) -> Op[str | None]:
        """Cancel a live job; returns the state it had, or None if it was not live."""
        rows = yield (
            self.q("cancel_job_one"),
            {"id": ref.uuid, "notify": notify, "channel": self.channel},
        )
        return rows[0]["previous_state"] if rows else None

    def retry_job(self, ref: Reference) -> Op[bool]:
        """Put a finished job back in line; False if it was not finished."""
        rows = yield self.q("retry_job_one"), {"id": ref.uuid}
        return bool(rows)

    def cancelled_among(self, refs: Iterable[Reference]) -> Op[set[Reference]]:
        """Which of ``refs`` have been cancelled."""
        rows = yield self.q("select_cancelled_among_many"), {"ids": [r.uuid for r in refs]}
        return {Reference(r["id"]) for r in rows}

    def running_of_worker(self, worker_id: str, age: float) -> Op[dict[Reference, int]]:
        """Jobs claimed by ``worker_id`` at least ``age`` seconds ago, with their attempt."""
        rows = yield (
            self.q("select_running_of_worker"),
            {"worker_id": worker_id, "age": float(age)},
        )
        return {Reference(r["id"]): r["attempts"] for r in rows}

    def recover_orphaned_jobs(
        self, leader: str, limit: int = 1000
    ) -> Op[list[tuple[Reference, str]]]:
        """As leaseholder ``leader``, hand back running jobs of dead workers; returns
        (job, new state) pairs. Does nothing if ``leader`` does not hold a live lease."""
        rows = yield self.q("recover_orphaned_jobs"), {"limit": limit, "leader": leader}
        return [(Reference(r["id"]), r["state"]) for r in rows]

    def prune_jobs(self, leader: str, rule: sql.Composable, params: Params, limit: int) -> Op[int]:
        """As leaseholder ``leader``, delete at most ``limit`` finished jobs matching
        ``rule``; returns the count (0 if ``leader`` does not hold a live lease)."""
        query = compose(_query_texts()["prune_jobs_many"], self.prefix, rule=rule)
        rows = yield query, {**params, "limit": limit, "leader": leader}
        return len(rows)

    # -- queues -----------------------------------------------------------------------

    def declare_queue(self, queue: Queue, *, upsert: bool, notify: bool) -> Op[Queue]:
        """Create ``queue`` (or update it with ``upsert``); returns the stored queue."""
        rows = yield (
            self.q("declare_queue_one"),
            {
                "name": queue.name,
                "state": queue.state.value,
                "concurrency": queue.concurrency,
                "tags": sorted(queue.tags),
                "executor": queue.executor,
                "executor_options": Jsonb(dict(queue.executor_options)),
                "polling_interval": queue.polling_interval,
                "rate_limit": queue.rate_limit,
                "rate_limit_window": queue.rate_limit_window,
                "resume_at": queue.resume_at,
                "eager_polling": queue.eager_polling,
                "concurrency_key_limit": queue.concurrency_key_limit,
                "upsert": upsert,
                "notify": notify,
                "channel": self.channel,
            },
        )
        return row_to_queue(rows[0])

    def get_queue(self, name: str) -> Op[Queue | None]:
        """The stored queue ``name``, or None."""
        rows = yield self.q("select_queue_one"), {"name": name}
        return row_to_queue(rows[0]) if rows else None

    def get_queues(self) -> Op[list[Queue]]:
        """Every declared queue, by name."""
        rows = yield self.q("select_queues_all"), None
        return [row_to_queue(r) for r in rows]

    def delete_queue(self, name: str, *, purge_jobs: bool, notify: bool) -> Op[bool]:
        """Delete a queue (and its jobs with ``purge_jobs``); False if it did not exist."""
        rows = yield (
            self.q("delete_queue_one"),
            {"name": name, "notify": notify, "channel": self.channel},
        )
        if purge_jobs:
            yield self.q("delete_jobs_of_queue"), {"queue": name}
        return bool(rows)

    def set_queue_state(
        self, name: str, state: Queue.State, resume_at: dt.datetime | None, *, notify: bool
    ) -> Op[Queue | None]:
        """Pause or resume a queue; returns it, or None if it does not exist."""
        rows = yield (
            self.q("set_queue_state_one"),
            {
                "name": name,
                "state": state.value,
                "resume_at": resume_at,
                "notify": notify,
                "channel": self.channel,
            },
        )
        return row_to_queue(rows[0]) if rows else None

    def resume_due_queues(self) -> Op[list[str]]:
        """Activate paused queues whose ``resume_at`` has passed."""
        rows = yield self.q("resume_due_queues"), None
        return [r["name"] for r in rows]

    # -- workers and leadership -------------------------------------------------------

    def heartbeat(
        self,
        worker_id: str,
        *,
        hostname: str,
        pid: int,
        tags: Iterable[str],
        queues: Iterable[str],
        timeout: float,
    ) -> Op[None]:
        """Register or refresh a worker, alive for ``timeout`` seconds of database time."""
        yield (
            self.q("upsert_worker_one"),
            {
                "worker_id": worker_id,
                "hostname": hostname,
                "pid": pid,
                "tags": sorted(tags),
                "queues": sorted(queues),
                "timeout": float(timeout),
            },
        )

    def autovacuum_enabled(self) -> Op[bool]:
        """Whether autovacuum runs for the jobs table (server setting and table option)."""
        rows = yield self.q("autovacuum_status"), {"table": self.prefix + "jobs"}
        return bool(rows and rows[0]["enabled"])

    def remove_worker(self, worker_id: str) -> Op[None]:
        """Forget a worker (on clean shutdown)."""
        yield self.q("delete_worker_one"), {"worker_id": worker_id}

    def delete_expired_workers(self, leader: str, grace: float) -> Op[list[str]]:
        """As leaseholder ``leader``, forget workers whose heartbeat expired more than
        ``grace`` seconds ago."""
        rows = yield (
            self.q("delete_expired_workers"),
            {"grace": float(grace), "leader": leader},
        )
        return [r["worker_id"] for r in rows]

    def get_workers(self) -> Op[list[Row]]:
        """Every registered worker with an ``is_leader`` flag."""
        rows = yield self.q("select_workers_all"), None
        return rows

    def acquire_lease(self, worker_id: str, timeout: float) -> Op[bool]:
        """Take or renew the leadership lease; True if ``worker_id`` holds it now."""
        rows = yield (
            self.q("acquire_lease_one"),
            {"worker_id": worker_id, "timeout": float(timeout)},
        )
        return bool(rows)

    def release_lease(self, worker_id: str) -> Op[None]:
        """Give up the lease if ``worker_id`` holds it."""
        yield self.q("release_lease_one"), {"worker_id": worker_id}

    def get_lease(self) -> Op[Row | None]:
        """The lease row, with a ``valid`` flag, or None."""
        rows = yield self.q("select_lease_one"), None
        return rows[0] if rows else None


#: The longest delay an outcome may ask for (ten years); more would overflow the interval.
MAX_DELAY = 10 * 365 * 86400.0


def _safe_delay(delay: Any) -> float:
    """A delay the completion statement can always use: one bad value (NaN, inf, huge)
    from a plugin or a job must not make the whole batch fail."""
    try:
        value = float(delay)
    except (TypeError, ValueError):
        return 0.0
    if value != value or value <= 0:
        return 0.0
    return min(value, MAX_DELAY)


def _dumps_lenient(value: Any) -> str:
    """JSON for a job's result, meta or error; what JSON (or jsonb) cannot hold is kept
    as its repr, and NUL characters are replaced."""
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False, default=repr)
    except (TypeError, ValueError):  # NaN/inf, circular structures
        encoded = json.dumps(repr(value))
    return _without_nul(encoded)


def row_to_job(row: Row) -> QueuedJob:
    """Build a :class:`QueuedJob` from a jobs row.

    The row comes from the database, which enforces the job's invariants, so the fields
    are set directly rather than through the validating constructor: a worker builds
    one per claimed job.
    """
    limits = row["limits"]
    job = object.__new__(QueuedJob)
    job.__dict__.update(
        id=Reference(row["id"]),
        queue=row["queue"],
        func=row["func"],
        kwargs=row["kwargs"],
        meta=row["meta"] if row["meta"] is not None else {},
        limits=[Limit.from_dict(limit) for limit in limits] if limits else [],
        priority=row["priority"],
        max_attempts=row["max_attempts"],
        unique_key=row["unique_key"],
        concurrency_key=row.get("concurrency_key"),
        scheduled_at=row["scheduled_at"],
        state=_STATES[row["state"]],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row.get("started_at"),
        completed_at=row.get("completed_at"),
        errors=list(row.get("errors") or ()),
        result=row.get("result"),
        taken_by=row.get("taken_by"),
        progress=row.get("progress"),
    )
    return job


_STATES = {state.value: state for state in QueuedJob.State}


def _claimed_job(row: tuple[Any, ...]) -> QueuedJob:
    """A :class:`QueuedJob` from a row of ``fetch_jobs_many`` (by position, as
    :func:`row_to_job` does by name): a claimed job has no outcome, errors are not read."""
    meta, limits = row[4], row[5]
    job = object.__new__(QueuedJob)
    # One dict, set as the instance's namespace (the frozen dataclass forbids setattr).
    object.__setattr__(
        job,
        "__dict__",
        {
            "id": Reference._of(row[0]),
            "queue": row[1],
            "func": row[2],
            "kwargs": row[3],
            "meta": meta if meta is not None else {},
            "limits": [Limit.from_dict(limit) for limit in limits] if limits else [],
            "priority": row[6],
            "state": _STATES[row[7]],
            "attempts": row[8],
            "max_attempts": row[9],
            "unique_key": row[10],
            "concurrency_key": row[11],
            "taken_by": row[12],
            "created_at": row[13],
            "scheduled_at": row[14],
            "started_at": row[15],
            "completed_at": None,
            "errors": [],
            "result": None,
            "progress": None,
        },
    )
    return job


def row_to_queue(row: Row) -> Queue:
    """Build a :class:`Queue` from a queues row."""
    return Queue(
        row["name"],
        concurrency=row["concurrency"],
        tags=frozenset(row["tags"]),
        state=row["state"],
        executor=row["executor"],
        executor_options=row["executor_options"],
        polling_interval=row["polling_interval"],
        rate_limit=row["rate_limit"],
        rate_limit_window=row["rate_limit_window"],
        resume_at=row["resume_at"],
        eager_polling=row["eager_polling"],
        concurrency_key_limit=row.get("concurrency_key_limit", 1),
    )


@functools.cache
def migration_steps(package: str) -> dict[int, tuple[str, str]]:
    """Version -> (up SQL, down SQL) for the ``NNNN_name.{up,down}.sql`` files of a package."""
    folder = importlib.resources.files(package)
    ups: dict[int, str] = {}
    downs: dict[int, str] = {}
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_\w+\.(up|down)\.sql$", entry.name)
        if match:
            target = ups if match.group(2) == "up" else downs
            target[int(match.group(1))] = entry.read_text()
    if set(ups) != set(downs):
        raise RuntimeError(f"migrations in {package} need both an up and a down file")
    return {v: (ups[v], downs[v]) for v in ups}


# -- drivers ----------------------------------------------------------------------------


def _has_rows(cur: psycopg.AsyncCursor[Any] | psycopg.Cursor[Any]) -> bool:
    """Whether the last statement returned rows (``cur.description`` would build a list
    of column objects to say so)."""
    result = cur.pgresult
    return result is not None and result.status == pq.ExecStatus.TUPLES_OK


async def arun(target: psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any], op: Op[T]) -> T:
    """Run a store operation on an async connection or cursor (in its transaction)."""
    conn = target if isinstance(target, psycopg.AsyncConnection) else target.connection
    async with conn.cursor(row_factory=dict_row) as cur:
        try:
            statement = next(op)
            while True:
                query, params = statement
                rows: list[Any]
                if isinstance(params, CopyRows):
                    async with cur.copy(query) as copy:
                        if params.text:
                            await copy.write(params.text)
                        for chunk in params.chunks:
                            await copy.write(chunk)
                        for values in params.rows:
                            await copy.write_row(values)
                    rows = []
                elif isinstance(params, TupleRows):
                    async with conn.cursor(row_factory=tuple_row) as tuples:
                        await tuples.execute(query, params.params)
                        rows = await tuples.fetchall() if _has_rows(tuples) else []
                else:
                    await cur.execute(query, params)
                    rows = await cur.fetchall() if _has_rows(cur) else []
                statement = op.send(rows)
        except StopIteration as stop:
            return typing.cast(T, stop.value)


async def arun_pipelined(conn: psycopg.AsyncConnection[Any], ops: Sequence[Op[Any]]) -> list[Any]:
    """Run single-statement operations in one round trip (pipeline mode); each statement
    is its own transaction on an autocommit connection. Returns their results in order."""
    results: list[Any] = [None] * len(ops)
    started: list[tuple[int, psycopg.AsyncCursor[Any]]] = []
    # Leaving the block sends the one Sync and reads every result: an explicit sync()
    # inside it would cost a second round trip (the exit always syncs again).
    async with conn.pipeline():
        for index, op in enumerate(ops):
            try:
                statement = next(op)
            except StopIteration as stop:
                results[index] = stop.value
                continue
            query, params = statement
            if isinstance(params, CopyRows):
                raise RuntimeError("arun_pipelined cannot run COPY")
            cur: psycopg.AsyncCursor[Any]
            if isinstance(params, TupleRows):
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(query, params.params)
            else:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(query, params)
            started.append((index, cur))
    for index, cur in started:
        rows = await cur.fetchall() if _has_rows(cur) else []
        try:
            ops[index].send(rows)
        except StopIteration as stop:
            results[index] = stop.value
        else:
            raise RuntimeError("arun_pipelined takes single-statement operations only")
        await cur.close()
    return results


def run(target: psycopg.Connection[Any] | psycopg.Cursor[Any], op: Op[T]) -> T:
    """Run a store operation on a sync connection or cursor (in its transaction)."""
    conn = target if isinstance(target, psycopg.Connection) else target.connection
    with conn.cursor(row_factory=dict_row) as cur:
        try:
            statement = next(op)
            while True:
                query, params = statement
                rows: list[Any]
                if isinstance(params, CopyRows):
                    with cur.copy(query) as copy:
                        if params.text:
                            copy.write(params.text)
                        for chunk in params.chunks:
                            copy.write(chunk)
                        for values in params.rows:
                            copy.write_row(values)
                    rows = []
                elif isinstance(params, TupleRows):
                    with conn.cursor(row_factory=tuple_row) as tuples:
                        tuples.execute(query, params.params)
                        rows = tuples.fetchall() if _has_rows(tuples) else []
                else:
                    cur.execute(query, params)
                    rows = cur.fetchall() if _has_rows(cur) else []
                statement = op.send(rows)
        except StopIteration as stop:
            return typing.cast(T, stop.value)
