"""examples/fastapi_app.py: lifespan, transactional push from a request, the in-process
worker and the optional dashboard mount, through FastAPI's TestClient."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    # Importable by name, as when uvicorn runs it: the worker imports jobs by their path.
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield importlib.import_module("fastapi_app")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def wait_for_state(client: TestClient, job_id: str, state: str, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/jobs/{job_id}").json()
        if body["state"] == state:
            return body  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_signup_pushes_a_job_that_the_in_process_worker_runs(example: ModuleType, dsn: str) -> None:
    with TestClient(example.create_app(dsn)) as client:
        response = client.post("/signup", json={"email": "ada@example.com"})
        assert response.status_code == 200
        job = wait_for_state(client, response.json()["job"], "succeeded")
        assert job["result"] == "welcome sent to ada@example.com"
        assert client.get("/jobs/not-an-id").status_code == 400
        assert client.get("/jobs/01890000-0000-7000-8000-000000000000").status_code == 404


def test_without_worker_jobs_wait_and_dashboard_mounts_only_if_installed(
    example: ModuleType, dsn: str
) -> None:
    with TestClient(example.create_app(dsn, run_worker=False)) as client:
        job_id = client.post("/signup", json={"email": "bob@example.com"}).json()["job"]
        assert client.get(f"/jobs/{job_id}").json()["state"] == "pending"
        installed = importlib.util.find_spec("chancy.plugins.api") is not None
        status = client.get("/chancy/api/v1/queues").status_code
        assert status in ((401, 403) if installed else (404,))
