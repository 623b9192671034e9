"""The dashboard in a real browser: headless Chromium driven by Playwright.

Uses the system Chromium (``apt-get install chromium``), never a browser downloaded by
Playwright. With ``CHANCY_SCREENSHOTS=1`` the screenshots go to ``docs/images/`` (for
``docs/dashboard.md``); otherwise to a temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright import async_api as playwright_api

from chancy import Chancy, Job, Queue
from chancy.plugins.api import Api
from chancy.plugins.cron import Cron
from chancy.plugins.workflow import Workflow, WorkflowPlugin
from tests import jobs_web
from tests.test_worker import poll, serving

CHROMIUM = os.environ.get("CHANCY_CHROMIUM", "/usr/bin/chromium")
USER, PASSWORD = "admin", "browser-pass"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    if os.environ.get("CHANCY_SCREENSHOTS") == "1":
        target = ROOT / "docs" / "images"
        target.mkdir(parents=True, exist_ok=True)
        return target
    return tmp_path


@pytest.fixture
async def browser_page() -> AsyncIterator[Any]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        problems: list[str] = []
        page.on(
            "console",
            lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None,
        )
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.problems = problems  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            await browser.close()


async def test_log_in_inspect_retry_and_pause(dsn: str, browser_page: Any, shots: Path) -> None:
    page = browser_page
    api = Api(port=0, users={USER: PASSWORD})
    app = Chancy(dsn, plugins=[api, Cron(), WorkflowPlugin(polling_interval=0.2)])
    async with app:
        await app.migrate()
        for name in ("default", "reports"):
            await app.declare(
                Queue(name, executor=Chancy.Executor.Async, polling_interval=0.1, concurrency=4)
            )
        await Cron.schedule(
            app,
            "0 3 * * *",
            Job(
                func="tests.jobs_web.step", kwargs={"name": "nightly"}, queue="reports"
            ).with_unique_key("nightly-report"),
        )
        workflow = (
            Workflow("thumbnails")
            .add("fetch", Job(func="tests.jobs_web.step", kwargs={"name": "fetch"}))
            .add_group(
                "resize",
                [Job(func="tests.jobs_web.step", kwargs={"name": f"r{i}"}) for i in range(3)],
                dependencies=["fetch"],
            )
            .add(
                "watermark",
                Job(func="tests.jobs_web.explode", kwargs={"message": "font missing"}),
                ["fetch"],
            )
            .add("publish", Job(func="tests.jobs_web.step", kwargs={"name": "p"}), ["resize"])
            .add("notify", Job(func="tests.jobs_web.step", kwargs={"name": "n"}), ["watermark"])
        )
        workflow_id = await WorkflowPlugin.push(app, workflow)
        jobs_web.FAILURES_LEFT["invoice-42"] = 1
        flaky = await app.push(
            Job(func="tests.jobs_web.flaky", kwargs={"key": "invoice-42"}, queue="default")
        )
        done = [
            await app.push(Job(func="tests.jobs_web.step", kwargs={"name": f"s{i}"}))
            for i in range(5)
        ]
        async with serving(app, worker_id="dashboard-demo-worker"):
            await app.wait_for_jobs([flaky, *done], timeout=30)

            async def workflow_finished() -> bool:
                found = await WorkflowPlugin.fetch_workflow(app, workflow_id)
                return found is not None and found.state.value in ("completed", "failed")

            await poll(workflow_finished, timeout=30)
            await poll(api.started.is_set)
            assert api.bound is not None
            base = "http://{}:{}".format(*api.bound)

            # Logging in: any page sends us to the login form first.
            await page.goto(base + "/jobs")
            assert page.url.startswith(base + "/login")
            await page.screenshot(path=str(shots / "login.png"))
            await page.fill("input[name=username]", USER)
            await page.fill("input[name=password]", "wrong")
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=Wrong user name or password.")
            await page.fill("input[name=username]", USER)
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(base + "/jobs")

            # The overview lists the queues, with a chart drawn by uPlot.
            await page.goto(base + "/")
            await page.wait_for_selector(".chart .uplot")
            assert await page.locator("table.grid >> text=default").count() == 1
            await page.screenshot(path=str(shots / "overview.png"), full_page=True)

            # The failed job and its traceback.
            await page.goto(base + "/jobs?state=failed")
            await page.screenshot(path=str(shots / "jobs.png"), full_page=True)
            await page.click(f"a[href='/jobs/{flaky}']")
            await page.wait_for_selector("pre.traceback")
            traceback = await page.inner_text("pre.traceback")
            assert "flaky job invoice-42 failed on purpose" in traceback
            assert "RuntimeError" in traceback
            await page.screenshot(path=str(shots / "job-failed.png"), full_page=True)

            # Retry it and watch it succeed (htmx refreshes the page).
            await page.click("button:has-text('Retry')")
            await page.wait_for_selector("text=Job put back in line.")
            await page.wait_for_selector("#live .actions .state-succeeded", timeout=20_000)
            assert (await app.get_job(flaky)).state.value == "succeeded"  # type: ignore[union-attr]
            await page.screenshot(path=str(shots / "job-succeeded.png"), full_page=True)

            # Pause a queue.
            await page.goto(base + "/queues/reports")
            await page.click("button:has-text('Pause queue')")
            await page.wait_for_selector("button:has-text('Resume queue')")
            assert (await app.get_queue("reports")).state.value == "paused"  # type: ignore[union-attr]
            await page.screenshot(path=str(shots / "queue-paused.png"), full_page=True)

            await page.goto(base + "/workers")
            await page.wait_for_selector("text=dashboard-demo-worker")
            await page.screenshot(path=str(shots / "workers.png"), full_page=True)

            await page.goto(base + "/crons")
            await page.wait_for_selector("text=nightly-report")
            await page.screenshot(path=str(shots / "crons.png"), full_page=True)

            # The workflow graph, steps coloured by state.
            await page.goto(base + "/workflows")
            await page.screenshot(path=str(shots / "workflows.png"), full_page=True)
            await page.click(f"a[href='/workflows/{workflow_id}']")
            await page.wait_for_selector(".graph svg g.node")
            states = {
                await node.get_attribute("data-step"): await node.get_attribute("class")
                for node in await page.query_selector_all(".graph svg g.node")
            }
            assert states["fetch"] == "node node-succeeded"
            assert states["watermark"] == "node node-failed"
            assert states["publish"] == "node node-succeeded"
            assert len(states) == 7
            await page.screenshot(path=str(shots / "workflow.png"), full_page=True)

            await page.goto(base + "/metrics")
            await page.wait_for_selector(".chart .uplot")
            await page.screenshot(path=str(shots / "metrics.png"), full_page=True)

            # Logging out ends the session.
            await page.click("button:has-text('Log out')")
            await page.wait_for_url(re.compile(r".*/login$"))
            await page.goto(base + "/")
            assert "/login" in page.url

    # No CSP violation, script error or failed request was reported by the browser (the
    # 401 of the wrong password is expected).
    assert [p for p in page.problems if "401 (Unauthorized)" not in p] == []
