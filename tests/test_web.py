"""The dashboard through Starlette's TestClient: every route and action, sessions, CSRF,
Origin checks, hostile parameters and escaping, against a real database."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from chancy import Chancy, Job, Queue
from chancy.errors import ConfigurationError
from chancy.plugins.api import Api, PasswordAuth, create_app, hash_password
from chancy.plugins.api.auth import Sessions, verify_password
from chancy.plugins.api.graph import Step, layout
from chancy.store import web as web_store
from tests.test_worker import poll, serving

USER, PASSWORD = "admin", "s3cret-pass"
SCRIPT = "<script>alert('owned')</script>"
PAGES = ["/", "/jobs", "/workers", "/crons", "/workflows", "/metrics", "/queues/default"]
API_GETS = [
    "/api/v1/queues",
    "/api/v1/jobs",
    "/api/v1/workers",
    "/api/v1/crons",
    "/api/v1/workflows",
    "/api/v1/metrics",
]


def client_for(
    dsn: str, *, auth: bool = True, base_url: str = "http://testserver", raise_errors: bool = True
) -> TestClient:
    chancy = Chancy(dsn)
    app = create_app(
        chancy,
        auth=PasswordAuth({USER: PASSWORD}) if auth else None,
        secret_key="k" * 32,
        manage_pool=True,
    )
    return TestClient(
        app, base_url=base_url, follow_redirects=False, raise_server_exceptions=raise_errors
    )


async def _seed(dsn: str) -> dict[str, str]:
    """A declared queue with a failed job (``<script>`` in kwargs and traceback), a
    pending job, and a succeeded job."""
    async with Chancy(dsn) as app:
        await app.migrate()
        await app.declare(Queue("default", executor=Chancy.Executor.Async, polling_interval=0.1))
        await app.declare(Queue("other", executor=Chancy.Executor.Async, polling_interval=0.1))
        failed = await app.push(
            Job(func="tests.jobs_web.explode", kwargs={"message": SCRIPT}, queue="default")
        )
        done = await app.push(
            Job(func="tests.jobs_web.step", kwargs={"name": "x"}, queue="default")
        )
        async with serving(app, queues=["default"]):
            await app.wait_for_jobs([failed, done], timeout=30)
        pending = await app.push(
            Job(func="tests.jobs_web.step", kwargs={"name": "later"}, queue="other")
        )
    return {"failed": str(failed), "succeeded": str(done), "pending": str(pending)}


@pytest.fixture
def seeded(dsn: str) -> dict[str, str]:
    return asyncio.run(_seed(dsn))


@pytest.fixture
def client(dsn: str, seeded: dict[str, str]) -> Iterator[TestClient]:
    with client_for(dsn) as c:
        yield c


def login(client: TestClient) -> str:
    """Log in through the JSON API; returns the CSRF token."""
    response = client.post("/api/v1/login", json={"username": USER, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return str(response.json()["csrf_token"])


def page_csrf(client: TestClient, path: str = "/") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match
    return match.group(1)


def job_state(dsn: str, job_id: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state FROM chancy_jobs WHERE id = %s", (job_id,)).fetchone()
    return row[0] if row else None


# -- access control -------------------------------------------------------------------


def test_every_page_redirects_to_login_and_every_api_route_answers_401(
    client: TestClient, seeded: dict[str, str]
) -> None:
    for path in [*PAGES, f"/jobs/{seeded['failed']}", "/workflows/1"]:
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next="), path
    for path in [*API_GETS, f"/api/v1/jobs/{seeded['failed']}", "/api/v1/workflows/1"]:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json() == {"error": "authentication required"}
    for path in [
        f"/api/v1/jobs/{seeded['failed']}/retry",
        "/api/v1/jobs/bulk",
        "/api/v1/queues/default/pause",
        "/api/v1/logout",
    ]:
        assert client.post(path, json={}).status_code == 401, path
    for path in [f"/jobs/{seeded['failed']}/retry", "/queues/default/pause", "/jobs/bulk"]:
        response = client.post(path, data={"csrf_token": "x"})
        assert response.status_code == 303 and "/login" in response.headers["location"]
    # An htmx poll with an expired session is told to go to the login page.
    response = client.get("/jobs", headers={"HX-Request": "true"})
    assert response.status_code == 401 and response.headers["hx-redirect"] == "/login"


def test_login_page_static_files_and_security_headers(client: TestClient) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    assert re.search(r'<input type="password" name="password"', page.text)
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text.replace('<script src="/static/', "")
    for asset in ("htmx-2.0.4.min.js", "uPlot-1.6.31.iife.min.js", "app.js", "app.css"):
        assert client.get(f"/static/{asset}").status_code == 200, asset


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2fstore%2fweb.py",
        "/static//etc/passwd",
        "/static/..%5capp.py",
    ],
)
def test_static_path_traversal_is_refused(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text and "root:" not in response.text


def test_form_login_sets_a_hardened_cookie_and_logout_revokes_it(client: TestClient) -> None:
    wrong = client.post("/login", data={"username": USER, "password": "nope", "next": "/jobs"})
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    assert "chancy_session" not in client.cookies
    response = client.post(
        "/login", data={"username": USER, "password": PASSWORD, "next": "/jobs?state=failed"}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/jobs?state=failed"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    assert client.get("/jobs").status_code == 200
    stolen = client.cookies["chancy_session"]
    token = page_csrf(client)
    out = client.post("/logout", data={"csrf_token": token})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    # The old cookie, replayed, no longer opens anything.
    client.cookies.set("chancy_session", stolen)
    assert client.get("/api/v1/queues").status_code == 401


def test_cookie_is_secure_under_https(dsn: str, seeded: dict[str, str]) -> None:
    with client_for(dsn, base_url="https://testserver") as client:
        response = client.post("/api/v1/login", json={"username": USER, "password": PASSWORD})
        assert "Secure" in response.headers["set-cookie"]


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil"])
def test_login_never_redirects_off_site(client: TestClient, target: str) -> None:
    response = client.post("/login", data={"username": USER, "password": PASSWORD, "next": target})
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_tampered_or_foreign_cookies_are_refused(client: TestClient) -> None:
    login(client)
    value = client.cookies["chancy_session"]
    payload, _, signature = value.partition(".")
    client.cookies.clear()
    client.cookies.set("chancy_session", payload + "." + signature[::-1])
    assert client.get("/api/v1/queues").status_code == 401
    other = Sessions("another-secret-key-0123456789")
    forged, _ = other.issue(USER)
    client.cookies.clear()
    client.cookies.set("chancy_session", forged)
    assert client.get("/api/v1/queues").status_code == 401


def test_api_login_rejects_bad_credentials_and_bodies(client: TestClient) -> None:
    assert client.post("/api/v1/login", json={"username": USER, "password": "x"}).status_code == 401
    assert (
        client.post("/api/v1/login", json={"username": "ghost", "password": "x"}).status_code == 401
    )
    assert client.post("/api/v1/login", json=["not", "an", "object"]).status_code == 400
    assert client.post("/api/v1/login", content=b"{broken").status_code == 400
    response = client.post("/api/v1/login", json={"username": 1, "password": ["x"]})
    assert response.status_code == 401


def test_repeated_failed_logins_are_throttled(client: TestClient) -> None:
    from chancy.plugins.api.app import MAX_FAILED_LOGINS

    for _ in range(MAX_FAILED_LOGINS):
        bad = client.post("/api/v1/login", json={"username": USER, "password": "guess"})
        assert bad.status_code == 401
    good = client.post("/api/v1/login", json={"username": USER, "password": PASSWORD})
    assert good.status_code == 429 and "chancy_session" not in client.cookies
    form = client.post("/login", data={"username": USER, "password": PASSWORD})
    assert form.status_code == 429 and "too many failed logins" in form.text


# -- reading --------------------------------------------------------------------------


def test_every_page_and_api_route_answers_after_login(
    client: TestClient, seeded: dict[str, str]
) -> None:
    login(client)
    for path in [*PAGES, f"/jobs/{seeded['failed']}", "/queues/other"]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "Internal Server Error" not in response.text
    queues = client.get("/api/v1/queues").json()["queues"]
    by_name = {q["name"]: q for q in queues}
    assert by_name["default"]["failed_1h"] == 1 and by_name["default"]["succeeded_1h"] == 1
    assert by_name["other"]["pending"] == 1 and by_name["other"]["state"] == "active"
    jobs = client.get("/api/v1/jobs").json()
    assert [j["id"] for j in jobs["jobs"]] == [
        seeded["pending"],
        seeded["succeeded"],
        seeded["failed"],
    ]
    assert jobs["next_before"] is None
    job = client.get(f"/api/v1/jobs/{seeded['failed']}").json()["job"]
    assert job["state"] == "failed" and "RuntimeError" in job["errors"][0]["traceback"]
    workers = client.get("/api/v1/workers").json()["workers"]
    assert workers == []  # the seeding worker deregistered on stop
    metrics = client.get("/api/v1/metrics?window=3600&bucket=60").json()["throughput"]
    assert len(metrics["t"]) == 60 and sum(metrics["failed"]) == 1
    assert sum(metrics["succeeded"]) == 1
    for path in ("/api/v1/crons", "/api/v1/workflows"):
        response = client.get(path)
        assert response.status_code in (200, 501), path
        assert "error" in response.json() or response.status_code == 200


def test_job_progress_is_shown(client: TestClient, seeded: dict[str, str], dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE chancy_jobs SET progress = %s WHERE id = %s",
            ('{"percent": 42.5, "message": "<b>resizing</b>"}', seeded["pending"]),
        )
    login(client)
    page = client.get(f"/jobs/{seeded['pending']}").text
    assert '<progress max="100" value="42.5">' in page
    assert "&lt;b&gt;resizing&lt;/b&gt;" in page and "<b>resizing" not in page
    job = client.get(f"/api/v1/jobs/{seeded['pending']}").json()["job"]
    assert job["progress"] == {"percent": 42.5, "message": "<b>resizing</b>"}


def test_unknown_things_answer_404(client: TestClient) -> None:
    login(client)
    assert client.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/api/v1/jobs/not-a-uuid").status_code == 404
    assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/queues/nope").status_code == 404
    assert client.get("/api/v1/nothing").status_code == 404


def test_job_list_filters(client: TestClient, seeded: dict[str, str]) -> None:
    login(client)

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/v1/jobs?{query}")
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["jobs"]]

    assert ids("state=failed") == [seeded["failed"]]
    assert ids("state=failed&state=succeeded") == [seeded["succeeded"], seeded["failed"]]
    assert ids("state=failed,pending") == [seeded["pending"], seeded["failed"]]
    assert ids("queue=other") == [seeded["pending"]]
    assert ids("func=tests.jobs_web.ex") == [seeded["failed"]]
    assert ids("text=LATER") == [seeded["pending"]]  # inside kwargs, any case
    assert ids("text=" + "%27%20OR%201%3D1--") == []
    assert ids("queue=%27%3B%20DROP%20TABLE%20chancy_jobs%3B--") == []
    page = client.get("/jobs?state=failed")
    assert page.status_code == 200 and seeded["failed"] in page.text
    assert seeded["pending"] not in page.text


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("limit=1000000000", 200),
        ("limit=-5", 200),
        ("limit=abc", 400),
        ("state=%27%20OR%201%3D1--", 400),
        ("state=failed%27--", 400),
        ("before=%27%20OR%201%3D1--", 400),
        ("before=00000000-0000-0000-0000-000000000000", 200),
        ("text=" + "x" * 201, 400),
        ("func=%25", 200),
        ("text=%25_%5C", 200),
    ],
)
def test_hostile_job_list_parameters(client: TestClient, query: str, status: int) -> None:
    login(client)
    response = client.get(f"/api/v1/jobs?{query}")
    assert response.status_code == status, response.text
    if status == 400:
        assert set(response.json()) == {"error"}
        assert "Traceback" not in response.text
    else:
        assert len(response.json()["jobs"]) <= web_store.MAX_PAGE
    page = client.get(f"/jobs?{query}")
    assert page.status_code == status


def test_limit_is_capped(dsn: str, seeded: dict[str, str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO chancy_jobs (id, queue, func) "
            "SELECT gen_random_uuid(), 'default', 'tests.jobs_web.step' "
            "FROM generate_series(1, %s)",
            (web_store.MAX_PAGE + 20,),
        )
    with client_for(dsn) as client:
        login(client)
        body = client.get("/api/v1/jobs?limit=1000000000").json()
        assert len(body["jobs"]) == web_store.MAX_PAGE and body["next_before"]


def test_user_data_is_escaped_everywhere(client: TestClient, seeded: dict[str, str]) -> None:
    login(client)
    for path in (f"/jobs/{seeded['failed']}", "/jobs", "/jobs?text=%3Cscript%3E"):
        text = client.get(path).text
        assert "<script>alert" not in text, path
        assert "&lt;script&gt;alert(" in text, path
    detail = client.get(f"/jobs/{seeded['failed']}").text
    assert 'class="traceback"' in detail and "RuntimeError: &lt;script&gt;" in detail
    api = client.get(f"/api/v1/jobs/{seeded['failed']}")
    assert api.headers["content-type"].startswith("application/json")


def test_server_errors_do_not_leak_details(dsn: str, seeded: dict[str, str]) -> None:
    with client_for(dsn, raise_errors=False) as client:
        login(client)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE chancy_jobs RENAME TO chancy_jobs_gone")
        response = client.get("/api/v1/jobs")
        assert response.status_code == 500
        assert "Traceback" not in response.text and "chancy_jobs" not in response.text


# -- actions --------------------------------------------------------------------------


def test_page_actions_need_a_valid_csrf_token(
    client: TestClient, seeded: dict[str, str], dsn: str
) -> None:
    login(client)
    target = f"/jobs/{seeded['failed']}/retry"
    assert client.post(target, data={}).status_code == 403
    assert client.post(target, data={"csrf_token": "forged"}).status_code == 403
    assert job_state(dsn, seeded["failed"]) == "failed"
    token = page_csrf(client)
    response = client.post(target, data={"csrf_token": token})
    assert response.status_code == 303
    assert response.headers["location"] == f"/jobs/{seeded['failed']}?msg=retried"
    assert job_state(dsn, seeded["failed"]) == "pending"


def test_api_actions_need_the_csrf_header(
    client: TestClient, seeded: dict[str, str], dsn: str
) -> None:
    token = login(client)
    target = f"/api/v1/jobs/{seeded['pending']}/cancel"
    assert client.post(target).status_code == 403
    assert client.post(target, headers={"X-CSRF-Token": "nope"}).status_code == 403
    assert job_state(dsn, seeded["pending"]) == "pending"
    response = client.post(target, headers={"X-CSRF-Token": token})
    assert response.status_code == 200 and response.json() == {"done": True}
    assert job_state(dsn, seeded["pending"]) == "cancelled"
    again = client.post(target, headers={"X-CSRF-Token": token})
    assert again.status_code == 409 and again.json() == {"done": False}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/page"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_origin_posts_are_refused(
    client: TestClient, seeded: dict[str, str], dsn: str, headers: dict[str, str]
) -> None:
    token = login(client)
    page_token = page_csrf(client)
    assert (
        client.post(
            f"/api/v1/jobs/{seeded['failed']}/retry", headers={"X-CSRF-Token": token, **headers}
        ).status_code
        == 403
    )
    assert (
        client.post(
            f"/jobs/{seeded['failed']}/retry", data={"csrf_token": page_token}, headers=headers
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/api/v1/login", json={"username": USER, "password": PASSWORD}, headers=headers
        ).status_code
        == 403
    )
    assert job_state(dsn, seeded["failed"]) == "failed"
    same = client.post(
        f"/api/v1/jobs/{seeded['failed']}/retry",
        headers={"X-CSRF-Token": token, "Origin": "http://testserver"},
    )
    assert same.status_code == 200


def test_retry_cancel_delete_are_logged(
    client: TestClient, seeded: dict[str, str], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = login(client)
    headers = {"X-CSRF-Token": token}
    with caplog.at_level(logging.INFO, logger="chancy.web"):
        assert client.post(f"/api/v1/jobs/{seeded['failed']}/retry", headers=headers).json()["done"]
        assert client.post(f"/api/v1/jobs/{seeded['failed']}/delete", headers=headers).json()[
            "done"
        ]
        assert job_state(dsn, seeded["failed"]) is None
        page_token = page_csrf(client)
        deleted = client.post(
            f"/jobs/{seeded['succeeded']}/delete", data={"csrf_token": page_token}
        )
        assert deleted.headers["location"] == "/jobs?msg=deleted"
        unknown = client.post(f"/api/v1/jobs/{seeded['pending']}/explode", headers=headers)
        assert unknown.status_code == 404
    messages = [r.getMessage() for r in caplog.records if r.name == "chancy.web"]
    assert any(f"admin retry job {seeded['failed']}" in m for m in messages)
    assert any(f"admin delete job {seeded['succeeded']}" in m for m in messages)


def test_a_running_job_is_not_deleted(client: TestClient, seeded: dict[str, str], dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE chancy_jobs SET state = 'running', taken_by = 'w', started_at = now(), "
            "attempts = 1 WHERE id = %s",
            (seeded["pending"],),
        )
    token = login(client)
    response = client.post(
        f"/api/v1/jobs/{seeded['pending']}/delete", headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 409 and job_state(dsn, seeded["pending"]) == "running"


def test_bulk_retry_and_cancel_follow_the_filter(
    client: TestClient, seeded: dict[str, str], dsn: str
) -> None:
    token = login(client)
    headers = {"X-CSRF-Token": token}
    response = client.post(
        "/api/v1/jobs/bulk", json={"action": "retry", "state": "failed"}, headers=headers
    )
    assert response.json() == {"count": 1}
    assert job_state(dsn, seeded["failed"]) == "pending"
    assert job_state(dsn, seeded["succeeded"]) == "succeeded"
    page_token = page_csrf(client, "/jobs")
    response = client.post(
        "/jobs/bulk",
        data={"csrf_token": page_token, "action": "cancel", "queue": "other", "state": ""},
    )
    assert response.status_code == 303 and "count=1" in response.headers["location"]
    assert job_state(dsn, seeded["pending"]) == "cancelled"
    assert job_state(dsn, seeded["failed"]) == "pending"
    bad = client.post("/api/v1/jobs/bulk", json={"action": "drop"}, headers=headers)
    assert bad.status_code == 400
    bad_state = client.post(
        "/api/v1/jobs/bulk", json={"action": "retry", "state": "' OR 1=1--"}, headers=headers
    )
    assert bad_state.status_code == 400


def test_pause_and_resume_a_queue(client: TestClient, dsn: str) -> None:
    token = login(client)
    response = client.post("/api/v1/queues/default/pause", headers={"X-CSRF-Token": token})
    assert response.status_code == 200 and response.json()["queue"]["state"] == "paused"
    page = client.get("/queues/default")
    assert "Resume queue" in page.text and "Pause queue" not in page.text
    response = client.post("/queues/default/resume", data={"csrf_token": page_csrf(client)})
    assert response.headers["location"] == "/queues/default?msg=resumed"
    assert "Queue resumed." in client.get(response.headers["location"]).text
    assert client.get("/api/v1/queues").json()["queues"][0]["state"] == "active"
    missing = client.post("/api/v1/queues/nope/pause", headers={"X-CSRF-Token": token})
    assert missing.status_code == 400
    unknown = client.post("/api/v1/queues/default/explode", headers={"X-CSRF-Token": token})
    assert unknown.status_code == 404


# -- plugins --------------------------------------------------------------------------


def test_cron_schedules_are_listed(dsn: str, seeded: dict[str, str]) -> None:
    from chancy.plugins.cron import Cron

    async def schedule() -> None:
        async with Chancy(dsn, plugins=[Cron()]) as app:
            await app.migrate()
            job = Job(
                func="tests.jobs_web.step",
                kwargs={"name": SCRIPT},
                queue="other",
                unique_key="nightly-report",
            )
            await Cron.schedule(app, "15 3 * * *", job, timezone="Europe/Paris")

    with client_for(dsn) as client:
        login(client)
        # Before the cron table exists the page explains instead of failing.
        page = client.get("/crons")
        assert page.status_code == 200 and "Cron schedules are not available" in page.text
        assert client.get("/api/v1/crons").status_code == 501
        asyncio.run(schedule())
        page = client.get("/crons")
        assert "nightly-report" in page.text and "15 3 * * *" in page.text
        assert "Europe/Paris" in page.text and "tests.jobs_web.step" in page.text
        crons = client.get("/api/v1/crons").json()["crons"]
        assert [c["unique_key"] for c in crons] == ["nightly-report"]
        assert crons[0]["job"]["kwargs"] == {"name": SCRIPT} and crons[0]["next_run"]
        assert "<script>alert" not in page.text


def _thumbnails() -> Any:
    from chancy.plugins.workflow import Workflow

    return (
        Workflow("thumbnails <b>")
        .add("fetch", Job(func="tests.jobs_web.step", kwargs={"name": "fetch"}))
        .add_group(
            "resize",
            [Job(func="tests.jobs_web.step", kwargs={"name": f"r{i}"}) for i in range(2)],
            dependencies=["fetch"],
        )
        .add("<script>x</script>", Job(func="tests.jobs_web.step", kwargs={"name": "w"}), "fetch")
        .add("publish", Job(func="tests.jobs_web.step", kwargs={"name": "p"}), ["resize"])
    )


def test_workflows_are_listed_and_drawn(dsn: str, seeded: dict[str, str]) -> None:
    from chancy.plugins.workflow import WorkflowPlugin

    async def push() -> str:
        async with Chancy(dsn) as app:
            return str(await WorkflowPlugin.push(app, _thumbnails()))

    workflow_id = asyncio.run(push())
    with client_for(dsn) as client:
        login(client)
        listing = client.get("/workflows")
        assert listing.status_code == 200 and workflow_id in listing.text
        assert "thumbnails &lt;b&gt;" in listing.text
        page = client.get(f"/workflows/{workflow_id}")
        assert page.status_code == 200
        svg = page.text[page.text.index("<svg") : page.text.index("</svg>")]
        assert svg.count('<g class="node') == 5
        # fetch -> resize.0, resize.1, <script> step; resize.0, resize.1 -> publish
        assert svg.count('class="edge"') == 5
        assert "<script>x" not in page.text and "&lt;script&gt;x&lt;/script&gt;" in svg
        body = client.get("/api/v1/workflows").json()["workflows"]
        assert [w["id"] for w in body] == [workflow_id]
        one = client.get(f"/api/v1/workflows/{workflow_id}").json()["workflow"]
        assert one["groups"] == {"resize": ["resize.0", "resize.1"]}
        assert one["steps"]["publish"]["dependencies"] == ["resize.0", "resize.1"]
        assert one["steps"]["fetch"]["job_id"] and one["steps"]["publish"]["state"] == "pending"
        for missing in (str(uuid.uuid4()), "not-an-id"):
            assert client.get(f"/api/v1/workflows/{missing}").status_code == 404
            assert client.get(f"/workflows/{missing}").status_code == 404
        assert client.get("/api/v1/workflows?state=bogus").status_code == 400
        assert client.get("/api/v1/workflows?state=pending").json()["workflows"]


def test_metrics_page_charts_the_metrics_plugin(client: TestClient) -> None:
    login(client)
    page = client.get("/metrics?window=86400")
    assert page.status_code == 200 and "not available" not in page.text
    assert 'data-key="plugin.counts"' in page.text
    body = client.get("/api/v1/metrics?window=3600&source=plugin").json()
    counts = body["plugin"]["counts"]
    assert len(counts["t"]) == 60 and body["plugin"]["resolution"] == "1m"
    # The seeding worker flushed its counters when it stopped.
    assert sum(counts["jobs.failed"]) == 1 and sum(counts["jobs.succeeded"]) == 1
    durations = body["plugin"]["durations"]["mean (s)"]
    assert any(value is not None and value >= 0 for value in durations)
    week = client.get("/api/v1/metrics?window=604800&source=plugin").json()["plugin"]
    assert week["resolution"] == "1h" and len(week["counts"]["t"]) == 168


def test_missing_plugin_tables_are_explained(dsn: str) -> None:
    async def bare() -> None:
        async with Chancy(dsn, no_default_plugins=True) as app:
            await app.migrate()
            await app.declare(Queue("default"))

    asyncio.run(bare())
    with client_for(dsn) as client:
        login(client)
        page = client.get("/metrics")
        assert page.status_code == 200 and "Metrics plugin data is not available" in page.text
        body = client.get("/api/v1/metrics?source=plugin").json()
        assert "plugin" not in body and body["plugin_error"]
        for path in ("/crons", "/workflows", "/"):
            assert client.get(path).status_code == 200, path
        assert "Workflows are not available" in client.get("/workflows").text
        assert "Workflows are not available" in client.get(f"/workflows/{uuid.uuid4()}").text
        assert client.get("/api/v1/workflows").status_code == 501


# -- without authentication -----------------------------------------------------------


def test_auth_off_serves_without_login_but_still_checks_csrf(
    dsn: str, seeded: dict[str, str]
) -> None:
    with client_for(dsn, auth=False) as client:
        for path in PAGES:
            assert client.get(path).status_code == 200, path
        assert client.get("/login").headers["location"] == "/"
        assert client.get("/api/v1/jobs").status_code == 200
        target = f"/api/v1/jobs/{seeded['failed']}/retry"
        assert client.post(target).status_code == 403
        token = client.post("/api/v1/login", json={}).json()["csrf_token"]
        assert client.post(target, headers={"X-CSRF-Token": token}).status_code == 200


def test_api_plugin_refuses_remote_bind_without_auth() -> None:
    with pytest.raises(ConfigurationError, match="without authentication"):
        Api(host="0.0.0.0")
    Api(host="0.0.0.0", allow_remote_without_auth=True)
    Api(host="0.0.0.0", users={"a": "b"})
    Api(host="::1")
    with pytest.raises(ConfigurationError):
        Api(users={"a": "b"}, auth=PasswordAuth({"c": "d"}))


# -- units ------------------------------------------------------------------------------


async def test_passwords_are_hashed_and_compared_in_constant_time() -> None:
    auth = PasswordAuth({"alice": "wonderland", "bob": hash_password("builder")})
    assert "wonderland" not in repr(vars(auth))
    assert await auth.authenticate("alice", "wonderland") == "alice"
    assert await auth.authenticate("bob", "builder") == "bob"
    assert await auth.authenticate("alice", "builder") is None
    assert await auth.authenticate("mallory", "wonderland") is None
    assert not verify_password("x", "md5$1$00$00")
    assert not verify_password("x", "garbage")


def test_sessions_expire_and_csrf_tokens_are_bound_to_the_session() -> None:
    sessions = Sessions("0123456789abcdef", max_age=-1)
    cookie, _ = sessions.issue("a")
    assert sessions.read(cookie) is None
    live = Sessions("0123456789abcdef")
    cookie, sid = live.issue("a")
    assert live.read(cookie) == ("a", sid)
    _, other_sid = live.issue("a")
    assert live.check_csrf(sid, live.csrf_token(sid))
    assert not live.check_csrf(sid, live.csrf_token(other_sid))
    assert not live.check_csrf(sid, None)
    with pytest.raises(ConfigurationError):
        Sessions("short")


def test_graph_layout_places_steps_after_their_dependencies() -> None:
    result = layout(
        [
            Step("fetch", "succeeded"),
            Step("resize", "running", ("fetch",)),
            Step("thumb", "pending", ("fetch",)),
            Step("publish", "pending", ("resize", "thumb", "missing")),
            Step("loop", "pending", ("loop",)),
        ]
    )
    x = {n.id: n.x for n in result.nodes}
    assert x["fetch"] < x["resize"] == x["thumb"] < x["publish"]
    assert x["loop"] == x["fetch"]
    assert len(result.edges) == 5  # the self-loop is drawn, the unknown dependency is not
    assert result.width > x["publish"]


# -- store ------------------------------------------------------------------------------


async def test_keyset_pages_do_not_overlap_and_bounded_scans_continue(chancy: Chancy) -> None:
    await chancy.declare(Queue("default"))
    refs = [
        r
        async for batch in chancy.push_many(
            [Job(func="tests.jobs_web.step", kwargs={"name": str(i)}) for i in range(25)]
        )
        for r in batch
    ]
    expected = [str(r) for r in reversed(refs)]
    store = chancy.store
    seen: list[str] = []
    before = None
    while True:
        page = await chancy._run(
            web_store.list_jobs(store, web_store.JobFilter(), limit=10, before=before)
        )
        seen.extend(str(j["id"]) for j in page.jobs)
        if page.next_before is None:
            break
        before = uuid.UUID(page.next_before)
    assert seen == expected
    # A selective filter with a tiny scan window comes back short, with a cursor to go on.
    only_first = web_store.JobFilter.parse(text='"0"')
    page = await chancy._run(web_store.list_jobs(store, only_first, limit=10, scan=10))
    assert page.jobs == [] and page.scanned == 10 and page.next_before == expected[9]
    ids = await chancy._run(web_store.collect_job_ids(store, only_first))
    assert [str(i) for i in ids] == [str(refs[0])]


async def test_job_listing_reads_the_primary_key_backwards(chancy: Chancy) -> None:
    """EXPLAIN: a page walks the primary key index from the cursor; it never scans or
    sorts the whole table, whatever the filter."""
    async with chancy.connection() as conn:
        await conn.execute(
            # Time-ordered ids, as uuid7 gives: i in the timestamp bits.
            "INSERT INTO chancy_jobs (id, queue, func, state, completed_at) "
            "SELECT (lpad(to_hex(i), 12, '0') || '7000800000000000' "
            "        || lpad(to_hex(i % 65536), 4, '0'))::uuid, "
            "'q' || (i % 7), 'tests.jobs_web.step', 'succeeded', now() "
            "FROM generate_series(1, 50000) AS i"
        )
        await conn.execute("ANALYZE chancy_jobs")
    store = chancy.store
    middle = uuid.UUID(f"{40000:012x}7000800000000000{40000 % 65536:04x}")
    for job_filter, before in itertools.product(
        (
            web_store.JobFilter(),
            web_store.JobFilter.parse(state="failed", queue="q3", text="zzz"),
        ),
        (None, middle),
    ):
        op = web_store.list_jobs(store, job_filter, limit=50, before=before, scan=2000)
        query, params = next(op)
        async with chancy.connection() as conn, conn.cursor() as cur:
            await cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)
            plan: Any = (await cur.fetchone())[0]  # type: ignore[index]
        nodes = list(_plan_nodes(plan[0]["Plan"]))
        scans = [n for n in nodes if n.get("Relation Name") == "chancy_jobs"]
        assert any(
            n["Node Type"] in ("Index Scan", "Index Only Scan")
            and n["Scan Direction"] == "Backward"
            and n["Index Name"] == "chancy_jobs_pkey"
            for n in scans
        ), scans
        assert not any(n["Node Type"] == "Seq Scan" for n in scans), scans
        op.close()
    # The counts and the chart read the live-job indexes and the finished index, never
    # the whole table.
    for aggregate in (web_store.queue_counts(store), web_store.throughput(store)):
        query, params = next(aggregate)
        async with chancy.connection() as conn, conn.cursor() as cur:
            await cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)
            plan = (await cur.fetchone())[0]  # type: ignore[index]
        nodes = list(_plan_nodes(plan[0]["Plan"]))
        scans = [n for n in nodes if n.get("Relation Name") == "chancy_jobs"]
        assert scans and not any(n["Node Type"] == "Seq Scan" for n in scans), scans
        aggregate.close()


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def test_throughput_fills_empty_buckets(chancy: Chancy) -> None:
    data = await chancy._run(web_store.throughput(chancy.store, window=600, bucket=60))
    assert len(data["t"]) == 10 and data["failed"] == [0] * 10
    assert data["t"] == sorted(data["t"]) and data["t"][1] - data["t"][0] == 60
    assert data["since"] is None


async def test_recent_counts_read_a_bounded_number_of_jobs(chancy: Chancy) -> None:
    async with chancy.connection() as conn:
        await conn.execute(
            "INSERT INTO chancy_jobs (id, queue, func, state, completed_at) "
            "SELECT gen_random_uuid(), 'q', 'f', 'succeeded', now() - make_interval(mins => i) "
            "FROM generate_series(1, 10) AS i"
        )
    store = chancy.store
    full = await chancy._run(web_store.queue_counts(store))
    assert full.queues["q"].recent == {"succeeded": 10} and full.recent_since is None
    capped = await chancy._run(web_store.queue_counts(store, max_rows=4))
    assert capped.queues["q"].recent == {"succeeded": 4}
    assert capped.recent_since is not None
    chart = await chancy._run(web_store.throughput(store, window=3600, max_rows=4))
    assert sum(chart["succeeded"]) == 4 and chart["since"] is not None
    everything = await chancy._run(web_store.throughput(store, window=3600))
    assert sum(everything["succeeded"]) == 10 and everything["since"] is None


async def test_a_busy_port_raises_instead_of_exiting(chancy: Chancy) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api = Api(port=taken.getsockname()[1], users={USER: PASSWORD})
        with pytest.raises(OSError):
            await api.serve(chancy, stop=asyncio.Event())
    assert not api.started.is_set()


async def test_the_api_plugin_serves_inside_a_worker(chancy: Chancy) -> None:
    import httpx2

    api = Api(port=0, users={USER: PASSWORD})
    app = Chancy(chancy.dsn, plugins=[api])
    async with app:
        async with serving(app):
            await poll(api.started.is_set)
            assert api.bound is not None
            host, port = api.bound
            async with httpx2.AsyncClient(base_url=f"http://{host}:{port}") as http:
                assert (await http.get("/login")).status_code == 200
                response = await http.post(
                    "/api/v1/login", json={"username": USER, "password": PASSWORD}
                )
                assert response.status_code == 200
                assert (await http.get("/api/v1/workers")).json()["workers"][0]["is_leader"] in (
                    True,
                    False,
                )
        assert not api.started.is_set()
