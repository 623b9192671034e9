"""Chancy in a FastAPI (or any Starlette) application.

- The lifespan opens Chancy's async pool for the life of the app.
- ``/signup`` pushes a job inside the request's own transaction (``push_ex``): the job
  exists if and only if the signup commits.
- With ``run_worker=True`` a worker runs inside the web process (handy for small apps and
  development; run ``chancy worker start`` separately in production).
- The dashboard is mounted under ``/chancy`` when ``chancy.plugins.api`` is installed
  (``pip install chancy[web]``).

Run it with ``uvicorn examples.fastapi_app:app`` (``CHANCY_DSN`` names the database).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from chancy import Chancy, Queue, Worker, job


@job(queue="emails", max_attempts=3)
async def send_welcome(*, email: str) -> str:
    """Stands in for a call to a mail service."""
    return f"welcome sent to {email}"


class Signup(BaseModel):
    email: str


def create_app(
    dsn: str,
    *,
    run_worker: bool = True,
    dashboard_users: dict[str, str] | None = None,
) -> FastAPI:
    """Build the application around a Chancy on ``dsn``."""
    chancy = Chancy(dsn)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with chancy:
            # Migrations and declarations belong in your deploy step; here for the demo.
            await chancy.migrate()
            await chancy.declare(Queue("emails", executor=Chancy.Executor.Async))
            if run_worker:
                async with Worker(chancy, register_signal_handlers=False):
                    yield
            else:
                yield

    app = FastAPI(lifespan=lifespan)
    app.state.chancy = chancy

    @app.post("/signup")
    async def signup(body: Signup) -> dict[str, str]:
        async with chancy.connection() as conn, conn.transaction():
            # ... INSERT the user on `conn` here: same transaction as the job ...
            ref = await chancy.push_ex(conn, send_welcome.job.with_kwargs(email=body.email))
        return {"job": str(ref)}

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        try:
            found = await chancy.get_job(job_id)
        except ValueError:
            raise HTTPException(status_code=400, detail="not a job id") from None
        if found is None:
            raise HTTPException(status_code=404, detail="no such job")
        return found.to_dict()

    mount_dashboard(app, chancy, dashboard_users or {"admin": os.urandom(16).hex()})
    return app


def mount_dashboard(app: FastAPI, chancy: Chancy, users: dict[str, str]) -> bool:
    """Mount Chancy's dashboard under ``/chancy`` if it is installed; True if mounted."""
    try:
        from chancy.plugins.api import PasswordAuth, create_app
    except ImportError:
        return False
    app.mount("/chancy", create_app(chancy, auth=PasswordAuth(users)))
    return True


app = create_app(os.environ.get("CHANCY_DSN", "postgresql://localhost/postgres"))
