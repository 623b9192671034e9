"""The dashboard's Starlette application: HTML pages, the JSON API under ``/api/v1/``,
login sessions, CSRF and Origin checks, and security headers."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chancy.errors import ChancyError
from chancy.job import FINISHED_STATES, QueuedJob, Reference
from chancy.plugins.api import graph, integrations
from chancy.plugins.api.auth import AuthBackend, Sessions
from chancy.queue import Queue
from chancy.store import Op
from chancy.store import web as web_store

if TYPE_CHECKING:
    from chancy.app import Chancy

COOKIE = "chancy_session"
MAX_FORM_BYTES = 64 * 1024
#: Failed logins from one address within the window before further attempts are refused.
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW = 300
#: How long aggregate counts are reused between polls.
CACHE_SECONDS = 2.0
LIVE_STATES = ("pending", "retrying", "running")
STATES = [s.value for s in QueuedJob.State]
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
MESSAGES = {
    "retried": "Job put back in line.",
    "cancelled": "Job cancelled.",
    "deleted": "Job deleted.",
    "paused": "Queue paused.",
    "resumed": "Queue resumed.",
    "not-retried": "The job is not finished (or another live job holds its unique key).",
    "not-cancelled": "The job was not pending or running.",
    "not-deleted": "A running job cannot be deleted: cancel it first.",
    "bulk": "Bulk action done.",
}

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


class DashboardError(Exception):
    """A request the dashboard refuses, with the status and message to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Reference):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.value
    plain = integrations.to_plain(value)
    if plain is not value:
        return plain
    return str(value)


def to_json(value: Any, *, indent: int | None = None) -> str:
    """JSON for responses and templates (datetimes, ids and dataclasses handled)."""
    return json.dumps(value, default=_json_default, indent=indent, sort_keys=indent is not None)


class Json(JSONResponse):
    """JSON response that understands datetimes, UUIDs, enums and dataclasses."""

    def render(self, content: Any) -> bytes:
        return to_json(content).encode()


class SecurityHeaders:
    """Adds CSP and related headers to every response; no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclasses.dataclass
class Session:
    """Who made a request."""

    user: str
    sid: str


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("chancy.plugins.api", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pretty"] = lambda value: to_json(value, indent=2)
    env.filters["short_executor"] = lambda path: str(path).rsplit(".", 1)[-1]
    env.filters["ago"] = _ago
    env.filters["ts"] = _timestamp
    return Jinja2Templates(env=env)


def _timestamp(value: dt.datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Dashboard:
    """Builds and serves the dashboard for one :class:`~chancy.Chancy`.

    ``auth=None`` turns login off (for a loopback-only dashboard); ``secret_key`` signs
    session cookies (random per process when None, so restarts log everyone out).
    """

    def __init__(
        self,
        chancy: Chancy,
        *,
        auth: AuthBackend | None,
        secret_key: str | bytes | None = None,
        session_max_age: int = 12 * 3600,
        log: logging.Logger | None = None,
        manage_pool: bool = False,
    ) -> None:
        self.chancy = chancy
        self.manage_pool = manage_pool
        self.auth = auth
        self.sessions = Sessions(secret_key, max_age=session_max_age)
        self.log = log or logging.getLogger("chancy.web")
        self.templates = _templates()
        self._failed_logins: dict[str, collections.deque[float]] = {}
        self._cache: dict[Hashable, tuple[float, Any]] = {}

    # -- application ------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Every page, API endpoint and the static files."""
        page, api = self._page, self._api
        return [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login_form, methods=["POST"]),
            Route("/logout", page(self.logout, post=True), methods=["POST"]),
            Route("/", page(self.overview), methods=["GET"]),
            Route("/queues/{name}", page(self.queue_page), methods=["GET"]),
            Route("/queues/{name}/{action}", page(self.queue_action, post=True), methods=["POST"]),
            Route("/jobs", page(self.jobs_page), methods=["GET"]),
            Route("/jobs/bulk", page(self.jobs_bulk, post=True), methods=["POST"]),
            Route("/jobs/{id}", page(self.job_page), methods=["GET"]),
            Route("/jobs/{id}/{action}", page(self.job_action, post=True), methods=["POST"]),
            Route("/workers", page(self.workers_page), methods=["GET"]),
            Route("/crons", page(self.crons_page), methods=["GET"]),
            Route("/workflows", page(self.workflows_page), methods=["GET"]),
            Route("/workflows/{id}", page(self.workflow_page), methods=["GET"]),
            Route("/metrics", page(self.metrics_page), methods=["GET"]),
            Route("/api/v1/login", self.api_login, methods=["POST"]),
            Route("/api/v1/logout", api(self.api_logout, post=True), methods=["POST"]),
            Route("/api/v1/queues", api(self.api_queues), methods=["GET"]),
            Route(
                "/api/v1/queues/{name}/{action}",
                api(self.api_queue_action, post=True),
                methods=["POST"],
            ),
            Route("/api/v1/jobs", api(self.api_jobs), methods=["GET"]),
            Route("/api/v1/jobs/bulk", api(self.api_jobs_bulk, post=True), methods=["POST"]),
            Route("/api/v1/jobs/{id}", api(self.api_job), methods=["GET"]),
            Route(
                "/api/v1/jobs/{id}/{action}", api(self.api_job_action, post=True), methods=["POST"]
            ),
            Route("/api/v1/workers", api(self.api_workers), methods=["GET"]),
            Route("/api/v1/crons", api(self.api_crons), methods=["GET"]),
            Route("/api/v1/workflows", api(self.api_workflows), methods=["GET"]),
            Route("/api/v1/workflows/{id}", api(self.api_workflow), methods=["GET"]),
            Route("/api/v1/metrics", api(self.api_metrics), methods=["GET"]),
            Mount(
                "/static",
                app=StaticFiles(packages=[("chancy.plugins.api", "static")]),
                name="static",
            ),
        ]

    def app(self) -> ASGIApp:
        """The ASGI application (Starlette wrapped in the security-headers middleware)."""
        starlette = Starlette(
            routes=self.routes(),
            exception_handlers={404: self._not_found},
            lifespan=self._lifespan if self.manage_pool else None,
        )
        return SecurityHeaders(starlette)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with self.chancy:
            yield

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return Json({"error": "not found"}, status_code=404)
        return Response("Not found", status_code=404, media_type="text/plain")

    # -- sessions, CSRF, origin -------------------------------------------------------

    def session_of(self, request: Request) -> Session | None:
        """The request's session, or None when login is required and missing."""
        if self.auth is None:
            return Session("anonymous", "anonymous")
        found = self.sessions.read(request.cookies.get(COOKIE))
        return Session(*found) if found else None

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """Unsafe requests must come from this site: the Origin (or Referer) header, when
        the browser sends one, names this host; Sec-Fetch-Site must not be cross-site."""
        if request.headers.get("sec-fetch-site") == "cross-site":
            return False
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        origin = request.headers.get("origin")
        if origin is not None:
            return origin == expected
        referer = request.headers.get("referer")
        if referer is not None:
            parts = urllib.parse.urlsplit(referer)
            return f"{parts.scheme}://{parts.netloc}" == expected
        return True

    async def _form(self, request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise DashboardError(413, "form too large")
        try:
            parsed = urllib.parse.parse_qs(body.decode(), max_num_fields=50)
        except (UnicodeDecodeError, ValueError):
            raise DashboardError(400, "malformed form") from None
        return {key: values[-1] for key, values in parsed.items()}

    async def _json_body(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise DashboardError(413, "request too large")
        if not body:
            return {}
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise DashboardError(400, "malformed JSON") from None
        if not isinstance(data, dict):
            raise DashboardError(400, "expected a JSON object")
        return data

    def _set_cookie(self, request: Request, response: Response, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.sessions.max_age,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )

    def _page(self, handler: Callable[..., Awaitable[Response]], *, post: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            session = self.session_of(request)
            if session is None:
                if request.headers.get("hx-request"):
                    return Response(status_code=401, headers={"HX-Redirect": "/login"})
                target = request.url.path
                if request.method == "GET" and request.url.query:
                    target += "?" + request.url.query
                query = urllib.parse.urlencode({"next": target})
                return RedirectResponse(f"/login?{query}", status_code=303)
            try:
                if post:
                    if not self._same_origin(request):
                        raise DashboardError(403, "cross-origin request refused")
                    form = await self._form(request)
                    token = form.get("csrf_token") or request.headers.get("x-csrf-token")
                    if not self.sessions.check_csrf(session.sid, token):
                        raise DashboardError(403, "invalid or missing CSRF token")
                    return await handler(request, session, form)
                return await handler(request, session)
            except DashboardError as exc:
                return self._error_page(request, session, exc.status, exc.message)
            except (ChancyError, web_store.WebQueryError) as exc:
                return self._error_page(request, session, 400, str(exc))

        return endpoint

    def _api(self, handler: Callable[..., Awaitable[Response]], *, post: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            session = self.session_of(request)
            if session is None:
                return Json({"error": "authentication required"}, status_code=401)
            try:
                if post:
                    if not self._same_origin(request):
                        raise DashboardError(403, "cross-origin request refused")
                    if not self.sessions.check_csrf(
                        session.sid, request.headers.get("x-csrf-token")
                    ):
                        raise DashboardError(403, "invalid or missing CSRF token")
                    return await handler(request, session, await self._json_body(request))
                return await handler(request, session)
            except DashboardError as exc:
                return Json({"error": exc.message}, status_code=exc.status)
            except (ChancyError, web_store.WebQueryError) as exc:
                return Json({"error": str(exc)}, status_code=400)

        return endpoint

    def render(
        self,
        request: Request,
        session: Session | None,
        name: str,
        status: int = 200,
        **context: Any,
    ) -> Response:
        """Render a template with the common context (user, CSRF token, nav)."""
        message = MESSAGES.get(request.query_params.get("msg", ""))
        if request.query_params.get("msg") == "bulk":
            count = request.query_params.get("count", "")
            message = f"Bulk action applied to {int(count) if count.isdigit() else 0} job(s)."
        base = {
            "request": request,
            "user": session.user if session else None,
            "auth": self.auth is not None,
            "csrf_token": self.sessions.csrf_token(session.sid) if session else "",
            "message": message,
            "states": STATES,
        }
        base.update(context)
        return self.templates.TemplateResponse(request, name, base, status_code=status)

    def _error_page(
        self, request: Request, session: Session | None, status: int, message: str
    ) -> Response:
        return self.render(request, session, "error.html", status=status, error=message)

    def _done(self, request: Request, path: str, msg: str) -> Response:
        return RedirectResponse(f"{path}?msg={msg}", status_code=303)

    # -- login ------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.auth is None or self.session_of(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self.render(
            request, None, "login.html", next=_safe_next(request.query_params.get("next"))
        )

    def _login_throttled(self, client: str) -> bool:
        failures = self._failed_logins.get(client)
        if not failures:
            return False
        horizon = time.monotonic() - FAILED_LOGIN_WINDOW
        while failures and failures[0] < horizon:
            failures.popleft()
        return len(failures) >= MAX_FAILED_LOGINS

    async def _login(self, request: Request, username: Any, password: Any) -> str | None:
        """The user for these credentials, or None. Raises a 429 DashboardError after
        too many failures from one client address."""
        if self.auth is None:
            return None
        client = request.client.host if request.client else "?"
        if self._login_throttled(client):
            self.log.warning("dashboard: login attempts from %s throttled", client)
            raise DashboardError(429, "too many failed logins: try again in a few minutes")
        user = None
        if (
            isinstance(username, str)
            and isinstance(password, str)
            and 0 < len(username) <= 200
            and 0 < len(password) <= 1024
        ):
            user = await self.auth.authenticate(username, password)
        if user is None:
            if len(self._failed_logins) > 10_000:  # bound the memory an attacker can use
                self._failed_logins.clear()
            failures = self._failed_logins.setdefault(
                client, collections.deque(maxlen=MAX_FAILED_LOGINS)
            )
            failures.append(time.monotonic())
            self.log.warning("dashboard: failed login for %r from %s", str(username)[:200], client)
        else:
            self._failed_logins.pop(client, None)
            self.log.info("dashboard: %s logged in from %s", user, client)
        return user

    async def login_form(self, request: Request) -> Response:
        if self.auth is None:
            return RedirectResponse("/", status_code=303)
        if not self._same_origin(request):
            return Response("cross-origin request refused", status_code=403)
        try:
            form = await self._form(request)
        except DashboardError as exc:
            return Response(exc.message, status_code=exc.status)
        next_path = _safe_next(form.get("next"))
        try:
            user = await self._login(request, form.get("username", ""), form.get("password", ""))
        except DashboardError as exc:
            return self.render(
                request, None, "login.html", status=exc.status, next=next_path, error=exc.message
            )
        if user is None:
            return self.render(
                request,
                None,
                "login.html",
                status=401,
                next=next_path,
                error="Wrong user name or password.",
            )
        cookie, _ = self.sessions.issue(user)
        response = RedirectResponse(next_path, status_code=303)
        self._set_cookie(request, response, cookie)
        return response

    async def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        self.sessions.revoke(session.sid)
        self.log.info("dashboard: %s logged out", session.user)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def api_login(self, request: Request) -> Response:
        if self.auth is None:
            session = Session("anonymous", "anonymous")
            return Json({"user": session.user, "csrf_token": self.sessions.csrf_token("anonymous")})
        if not self._same_origin(request):
            return Json({"error": "cross-origin request refused"}, status_code=403)
        try:
            data = await self._json_body(request)
        except DashboardError as exc:
            return Json({"error": exc.message}, status_code=exc.status)
        try:
            user = await self._login(request, data.get("username"), data.get("password"))
        except DashboardError as exc:
            return Json({"error": exc.message}, status_code=exc.status)
        if user is None:
            return Json({"error": "wrong user name or password"}, status_code=401)
        cookie, sid = self.sessions.issue(user)
        response = Json({"user": user, "csrf_token": self.sessions.csrf_token(sid)})
        self._set_cookie(request, response, cookie)
        return response

    async def api_logout(
        self, request: Request, session: Session, data: dict[str, Any]
    ) -> Response:
        self.sessions.revoke(session.sid)
        response = Json({"ok": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- data -------------------------------------------------------------------------

    async def _cached(self, key: Hashable, op: Op[T]) -> T:
        """Run an aggregate query at most once per CACHE_SECONDS for all viewers (every
        open page polls; the counts read many rows)."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            op.close()
            return cast(T, hit[1])
        value = await self.chancy._run(op)
        if len(self._cache) > 100:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[key] = (now + CACHE_SECONDS, value)
        return value

    async def _queues(self) -> tuple[list[dict[str, Any]], dt.datetime | None]:
        """Queues with their counts, and when the recent counts start if they do not
        cover the whole hour."""
        queues = await self.chancy.get_all_queues()
        found = await self._cached("counts", web_store.queue_counts(self.chancy.store))
        counts = found.queues
        result = []
        names = {q.name for q in queues}
        for queue in queues:
            entry = counts.get(queue.name, web_store.QueueCounts({}, {}))
            result.append(_queue_dict(queue, entry, declared=True))
        for name in sorted(set(counts) - names):  # jobs pushed ahead of a declaration
            result.append({"name": name, "declared": False, **_counts_dict(counts[name])})
        return result, found.recent_since

    async def _job_page(self, request: Request) -> tuple[web_store.JobFilter, web_store.JobPage]:
        params = request.query_params
        job_filter = web_store.JobFilter.parse(
            state=params.getlist("state") or None,
            queue=params.get("queue"),
            func=params.get("func"),
            text=params.get("text"),
        )
        limit = _int_param(params.get("limit"), default=50, low=1, high=web_store.MAX_PAGE)
        before = web_store.parse_cursor(params.get("before"))
        page = await self.chancy._run(
            web_store.list_jobs(self.chancy.store, job_filter, limit=limit, before=before)
        )
        return job_filter, page

    async def _get_job(self, job_id: str) -> QueuedJob:
        try:
            ref = Reference(job_id)
        except (ValueError, TypeError, ChancyError):
            raise DashboardError(404, "no such job") from None
        job = await self.chancy.get_job(ref)
        if job is None:
            raise DashboardError(404, "no such job")
        return job

    async def _job_action(self, session: Session, job_id: str, action: str) -> bool:
        job = await self._get_job(job_id)
        store = self.chancy.store
        if action == "retry":
            done = await self.chancy.retry_job(job.id)
        elif action == "cancel":
            done = await self.chancy.cancel_job(job.id)
        elif action == "delete":
            done = bool(await self.chancy._run(web_store.delete_jobs(store, [job.id])))
        else:
            raise DashboardError(404, "unknown action")
        self.log.info(
            "dashboard: %s %s job %s (%s): %s",
            session.user,
            action,
            job.id,
            job.func,
            "done" if done else "refused",
        )
        return done

    async def _queue_action(self, session: Session, name: str, action: str) -> Queue:
        if action == "pause":
            queue = await self.chancy.pause_queue(name)
        elif action == "resume":
            queue = await self.chancy.resume_queue(name)
        else:
            raise DashboardError(404, "unknown action")
        self.log.info("dashboard: %s %sd queue %s", session.user, action, name)
        return queue

    async def _bulk(self, session: Session, values: Mapping[str, Any]) -> int:
        action = values.get("action")
        if action not in ("retry", "cancel"):
            raise DashboardError(400, "bulk action must be retry or cancel")
        state = values.get("state")
        job_filter = web_store.JobFilter.parse(
            state=state if isinstance(state, str | list) else None,
            queue=_str_or_none(values.get("queue")),
            func=_str_or_none(values.get("func")),
            text=_str_or_none(values.get("text")),
        )
        store = self.chancy.store
        ids = await self.chancy._run(web_store.collect_job_ids(store, job_filter))
        if action == "retry":
            try:
                done = await self.chancy._run(web_store.retry_jobs(store, ids))
            except ChancyError:
                raise
            except Exception as exc:  # a unique-key clash within the batch: go one by one
                if type(exc).__name__ != "UniqueViolation":
                    raise
                done = [i for i in ids if await self.chancy.retry_job(i)]
        else:
            done = await self.chancy._run(
                web_store.cancel_jobs(store, ids, notify=self.chancy.notifications)
            )
        self.log.info(
            "dashboard: %s bulk %s of %d job(s) matching %s: %d done",
            session.user,
            action,
            len(ids),
            dataclasses.asdict(job_filter),
            len(done),
        )
        return len(done)

    # -- pages ------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        queues, since = await self._queues()
        workers = await self.chancy._run(web_store.list_workers(self.chancy.store))
        return self.render(
            request, session, "overview.html", queues=queues, workers=workers, since=since
        )

    async def queue_page(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]
        queues, _ = await self._queues()
        queue = next((q for q in queues if q["name"] == name), None)
        if queue is None:
            raise DashboardError(404, "no such queue")
        return self.render(request, session, "queue.html", queue=queue)

    async def queue_action(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response:
        name = request.path_params["name"]
        action = request.path_params["action"]
        await self._queue_action(session, name, action)
        return self._done(request, f"/queues/{urllib.parse.quote(name)}", f"{action}d")

    async def jobs_page(self, request: Request, session: Session) -> Response:
        job_filter, page = await self._job_page(request)
        queues = [q.name for q in await self.chancy.get_all_queues()]
        params = {
            "state": list(job_filter.states),
            "queue": job_filter.queue or "",
            "func": job_filter.func or "",
            "text": job_filter.text or "",
        }
        next_query = None
        if page.next_before:
            next_query = urllib.parse.urlencode({**params, "before": page.next_before}, doseq=True)
        return self.render(
            request,
            session,
            "jobs.html",
            page=page,
            filter=params,
            queues=queues,
            next_query=next_query,
            newest_query=urllib.parse.urlencode(params, doseq=True),
            paged=bool(request.query_params.get("before")),
        )

    async def jobs_bulk(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        count = await self._bulk(session, form)
        params = {k: form.get(k, "") for k in ("state", "queue", "func", "text")}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
        return RedirectResponse(f"/jobs?{query}&msg=bulk&count={count}", status_code=303)

    async def job_page(self, request: Request, session: Session) -> Response:
        job = await self._get_job(request.path_params["id"])
        progress, progress_message = _progress_of(job)
        timeline = [
            ("created", job.created_at),
            ("scheduled", job.scheduled_at),
            ("started", job.started_at),
            (job.state.value if job.state in FINISHED_STATES else "completed", job.completed_at),
        ]
        return self.render(
            request,
            session,
            "job.html",
            job=job,
            progress=progress,
            progress_message=progress_message,
            timeline=timeline,
            finished=job.state in FINISHED_STATES,
            live=job.state.value in LIVE_STATES,
        )

    async def job_action(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response:
        job_id, action = request.path_params["id"], request.path_params["action"]
        done = await self._job_action(session, job_id, action)
        past = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
        if action == "delete" and done:
            return self._done(request, "/jobs", past)
        return self._done(request, f"/jobs/{job_id}", past if done else f"not-{past}")

    async def workers_page(self, request: Request, session: Session) -> Response:
        workers = await self.chancy._run(web_store.list_workers(self.chancy.store))
        return self.render(request, session, "workers.html", workers=workers)

    async def crons_page(self, request: Request, session: Session) -> Response:
        schedules = await integrations.cron_schedules(self.chancy)
        if isinstance(schedules, integrations.Unavailable):
            return self.render(request, session, "crons.html", unavailable=schedules.reason)
        rows = [
            {**value, "job": integrations.to_plain(value.get("job"))}
            for _, value in sorted(schedules.items())
        ]
        return self.render(request, session, "crons.html", unavailable=None, schedules=rows)

    async def workflows_page(self, request: Request, session: Session) -> Response:
        found = await integrations.workflows(self.chancy, states=None, limit=100, before=None)
        if isinstance(found, integrations.Unavailable):
            return self.render(request, session, "workflows.html", unavailable=found.reason)
        rows = [_workflow_dict(w) for w in found]
        return self.render(request, session, "workflows.html", unavailable=None, workflows=rows)

    async def workflow_page(self, request: Request, session: Session) -> Response:
        found = await integrations.workflow(self.chancy, request.path_params["id"])
        if isinstance(found, integrations.Unavailable):
            return self.render(
                request, session, "workflow.html", unavailable=found.reason, workflow=None
            )
        if found is None:
            raise DashboardError(404, "no such workflow")
        data = _workflow_dict(found)
        return self.render(
            request,
            session,
            "workflow.html",
            unavailable=None,
            workflow=data,
            graph=_workflow_graph(data),
        )

    async def metrics_page(self, request: Request, session: Session) -> Response:
        queues = [q.name for q in await self.chancy.get_all_queues()]
        window = _int_param(
            request.query_params.get("window"), default=3600, low=60, high=7 * 86400
        )
        found = await self._metrics(window, None)
        unavailable = found.reason if isinstance(found, integrations.Unavailable) else None
        return self.render(
            request,
            session,
            "metrics.html",
            queues=queues,
            unavailable=unavailable,
            window=window,
        )

    # -- JSON API ---------------------------------------------------------------------

    async def api_queues(self, request: Request, session: Session) -> Response:
        queues, since = await self._queues()
        return Json({"queues": queues, "recent_since": since})

    async def api_queue_action(
        self, request: Request, session: Session, data: dict[str, Any]
    ) -> Response:
        queue = await self._queue_action(
            session, request.path_params["name"], request.path_params["action"]
        )
        return Json({"queue": queue.to_dict()})

    async def api_jobs(self, request: Request, session: Session) -> Response:
        _, page = await self._job_page(request)
        return Json({"jobs": page.jobs, "next_before": page.next_before, "scanned": page.scanned})

    async def api_jobs_bulk(
        self, request: Request, session: Session, data: dict[str, Any]
    ) -> Response:
        return Json({"count": await self._bulk(session, data)})

    async def api_job(self, request: Request, session: Session) -> Response:
        job = await self._get_job(request.path_params["id"])
        return Json({"job": job.to_dict()})

    async def api_job_action(
        self, request: Request, session: Session, data: dict[str, Any]
    ) -> Response:
        done = await self._job_action(
            session, request.path_params["id"], request.path_params["action"]
        )
        return Json({"done": done}, status_code=200 if done else 409)

    async def api_workers(self, request: Request, session: Session) -> Response:
        workers = await self.chancy._run(web_store.list_workers(self.chancy.store))
        return Json({"workers": workers})

    async def api_crons(self, request: Request, session: Session) -> Response:
        schedules = await integrations.cron_schedules(self.chancy)
        if isinstance(schedules, integrations.Unavailable):
            return Json({"error": schedules.reason, "crons": []}, status_code=501)
        return Json({"crons": list(schedules.values())})

    async def api_workflows(self, request: Request, session: Session) -> Response:
        params = request.query_params
        limit = _int_param(params.get("limit"), default=50, low=1, high=web_store.MAX_PAGE)
        states = [s for s in params.getlist("state") if s] or None
        found = await integrations.workflows(
            self.chancy, states=states, limit=limit, before=params.get("before") or None
        )
        if isinstance(found, integrations.Unavailable):
            return Json({"error": found.reason, "workflows": []}, status_code=501)
        return Json({"workflows": [_workflow_dict(w) for w in found]})

    async def api_workflow(self, request: Request, session: Session) -> Response:
        found = await integrations.workflow(self.chancy, request.path_params["id"])
        if isinstance(found, integrations.Unavailable):
            return Json({"error": found.reason}, status_code=501)
        if found is None:
            return Json({"error": "no such workflow"}, status_code=404)
        return Json({"workflow": _workflow_dict(found)})

    async def api_metrics(self, request: Request, session: Session) -> Response:
        params = request.query_params
        window = _int_param(params.get("window"), default=3600, low=60, high=7 * 86400)
        bucket = _int_param(params.get("bucket"), default=60, low=1, high=86400)
        bucket = max(bucket, window // 1000)  # at most 1000 points
        queue = params.get("queue") or None
        throughput = await self._cached(
            ("throughput", window, bucket, queue),
            web_store.throughput(self.chancy.store, window=window, bucket=bucket, queue=queue),
        )
        body: dict[str, Any] = {"throughput": throughput}
        if params.get("source") == "plugin":
            found = await self._metrics(window, queue)
            if isinstance(found, integrations.Unavailable):
                body["plugin_error"] = found.reason
            else:
                body["plugin"] = found
        return Json(body)

    async def _metrics(self, window: int, queue: str | None) -> Any:
        now = time.monotonic()
        key = ("plugin", window, queue)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await integrations.metrics(self.chancy, window=window, queue=queue)
        self._cache[key] = (now + CACHE_SECONDS, value)
        return value


def _progress_of(job: QueuedJob) -> tuple[float | None, str | None]:
    """(percent, message) the job reported, from ``job.progress`` (or a number in
    ``meta["progress"]``)."""
    reported = getattr(job, "progress", None)
    percent: Any = None
    message: Any = None
    if isinstance(reported, Mapping):
        percent, message = reported.get("percent"), reported.get("message")
    elif isinstance(job.meta, Mapping):
        percent = job.meta.get("progress")
    if not isinstance(percent, int | float) or isinstance(percent, bool):
        percent = None
    else:
        percent = max(0.0, min(float(percent), 100.0))
    return percent, str(message) if message is not None else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int_param(raw: str | None, *, default: int, low: int, high: int) -> int:
    """An integer query parameter clamped to [low, high]; junk means the default."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web_store.WebQueryError("expected an integer parameter") from None
    return max(low, min(value, high))


def _safe_next(value: str | None) -> str:
    """A local path to go to after login (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _counts_dict(counts: web_store.QueueCounts) -> dict[str, int]:
    return {
        "pending": counts.live.get("pending", 0),
        "retrying": counts.live.get("retrying", 0),
        "running": counts.live.get("running", 0),
        "succeeded_1h": counts.recent.get("succeeded", 0),
        "failed_1h": counts.recent.get("failed", 0),
        "cancelled_1h": counts.recent.get("cancelled", 0),
    }


def _queue_dict(queue: Queue, counts: web_store.QueueCounts, *, declared: bool) -> dict[str, Any]:
    return {**queue.to_dict(), "declared": declared, **_counts_dict(counts)}


def _workflow_dict(workflow: Any) -> dict[str, Any]:
    return integrations.workflow_dict(workflow)


def _workflow_graph(data: Mapping[str, Any]) -> graph.Layout:
    steps_raw = data.get("steps") or {}
    items = steps_raw.items() if isinstance(steps_raw, Mapping) else enumerate(steps_raw)
    groups = data.get("groups") or {}
    steps = []
    for key, raw in items:
        step = integrations.to_plain(raw)
        if not isinstance(step, Mapping):
            continue
        step_id = str(step.get("step_id") or step.get("id") or key)
        job_id = step.get("job_id")
        steps.append(
            graph.Step(
                id=step_id,
                state=str(step.get("state") or "pending"),
                # A dependency may name a group: the step waits for each of its members.
                dependencies=tuple(
                    member
                    for d in step.get("dependencies") or ()
                    for member in (groups.get(str(d)) or [str(d)])
                ),
                href=f"/jobs/{job_id}" if job_id else None,
            )
        )
    return graph.layout(steps)
