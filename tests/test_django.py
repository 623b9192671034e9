"""Django integration without the tasks framework: DSN from DATABASES, push on Django's
connection inside its transaction, on_commit pushes, the read-only admin and the
``manage.py chancy`` command (Python 3.12+ with Django 6: scripts/test-django)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.tasks import task_backends

from chancy import Chancy, Job
from chancy.contrib.django import database_dsn, opened, push, push_many, push_on_commit
from chancy.contrib.django.models import Job as JobRow
from chancy.contrib.django.models import Queue as QueueRow
from tests.conftest import ROOT
from tests.django_project import tasks
from tests.django_project.helpers import work_until_finished

pytest_plugins = ["tests.django_project.fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def a_job(n: int = 1) -> Job:
    return Job(func="json.dumps", queue="default", kwargs={"obj": n})


def test_database_dsn_keeps_libpq_options_only() -> None:
    dsn = database_dsn(
        {
            "NAME": "shop",
            "USER": "web",
            "HOST": "db.internal",
            "PORT": 6432,
            "OPTIONS": {"sslmode": "require", "pool": True, "server_side_binding": True},
        }
    )
    assert set(dsn.split()) == {
        "dbname=shop",
        "user=web",
        "host=db.internal",
        "port=6432",
        "sslmode=require",
    }


def test_chancy_accepts_the_databases_entry_itself() -> None:
    from django.conf import settings

    entry = settings.DATABASES["default"]
    assert "server_side_binding" in entry["OPTIONS"]
    assert Chancy(entry).dsn == database_dsn(entry)


def test_push_commits_and_rolls_back_with_the_django_transaction(chancy_tables: Chancy) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        lost = push(a_job(1))
        raise RuntimeError("roll back")
    with transaction.atomic():
        kept = push(a_job(2))
        [many] = push_many([a_job(3)])
        # Not committed yet: the app's own pool cannot see it.
        assert opened(chancy_tables).sync_get_job(kept) is None
    app = opened(chancy_tables)
    assert app.sync_get_job(lost) is None
    assert app.sync_get_job(kept) is not None and app.sync_get_job(many) is not None
    outside = push(a_job(4))  # autocommit outside a transaction
    assert app.sync_get_job(outside) is not None


def test_push_on_commit_waits_for_the_commit(chancy_tables: Chancy) -> None:
    app = opened(chancy_tables)
    with pytest.raises(RuntimeError), transaction.atomic():
        push_on_commit(a_job(10))
        raise RuntimeError("roll back")
    with transaction.atomic():
        push_on_commit(a_job(11))
        assert not JobRow.objects.filter(kwargs__obj=11).exists()
    assert not JobRow.objects.filter(kwargs__obj=10).exists()
    [row] = JobRow.objects.filter(kwargs__obj=11)
    assert app.sync_get_job(str(row.id)) is not None


def test_admin_lists_and_shows_jobs_and_queues_read_only(
    chancy_tables: Chancy, admin_client: Any
) -> None:
    ref = push(Job(func="json.dumps", queue="default", kwargs={"obj": "admin-visible"}))
    page = admin_client.get("/admin/chancy/job/")
    assert page.status_code == 200 and "json.dumps" in page.content.decode()
    detail = admin_client.get(f"/admin/chancy/job/{ref}/change/")
    assert detail.status_code == 200 and "admin-visible" in detail.content.decode()
    assert admin_client.get("/admin/chancy/job/?state__exact=pending").status_code == 200
    failed = tasks.fail.enqueue("shown in admin")
    work_until_finished(chancy_tables, [failed.id])
    shown = admin_client.get(f"/admin/chancy/job/{failed.id}/change/").content.decode()
    assert "<pre>Traceback" in shown and "ValueError: shown in admin" in shown
    queues = admin_client.get("/admin/chancy/queue/")
    assert queues.status_code == 200 and "django-process" in queues.content.decode()
    assert admin_client.get("/admin/chancy/worker/").status_code == 200
    assert admin_client.get("/admin/chancy/job/add/").status_code == 403
    deleted = admin_client.post(f"/admin/chancy/job/{ref}/delete/", {"post": "yes"})
    assert deleted.status_code == 403 and JobRow.objects.filter(id=str(ref)).exists()
    assert QueueRow.objects.get(name="default").executor == Chancy.Executor.Threaded


def test_manage_py_chancy_wraps_the_cli(
    chancy_tables: Chancy, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = push(a_job(5))
    call_command("chancy", "queue", "list")
    listed = capsys.readouterr().out
    assert "default" in listed and "django-process" in listed
    call_command("chancy", "job", "get", str(ref))
    assert str(ref) in capsys.readouterr().out
    with pytest.raises(CommandError):
        call_command("chancy", "job", "get", "not-an-id")


def test_manage_py_chancy_worker_start_serves_the_tasks_backend(
    chancy_tables: Chancy, tmp_path: Any
) -> None:
    result = tasks.add.enqueue(20, 22)
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.django_project.settings"
    env["PYTHONPATH"] = str(ROOT)
    worker = subprocess.Popen(
        [sys.executable, "-m", "django", "chancy", "worker", "start", "--worker-id", "dj-cli"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import asyncio

        async def wait() -> Any:
            async with chancy_tables:
                return await chancy_tables.wait_for_job(result.id, timeout=60)

        job = asyncio.run(wait())
        assert job is not None and job.state == "succeeded" and job.taken_by == "dj-cli"
        assert tasks.add.get_result(result.id).return_value == 42
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert "worker dj-cli serving" in output
    assert task_backends["default"].queues == {"default", "django"}


def test_apush_from_async_code(chancy_tables: Chancy) -> None:
    import asyncio

    from chancy.contrib.django import apush

    ref = asyncio.run(apush(a_job(6)))
    assert opened(chancy_tables).sync_get_job(ref) is not None


def test_admin_of_a_plugin_table_that_does_not_exist_explains_itself(
    chancy_tables: Chancy, admin_client: Any
) -> None:
    # The test project's Chancy has no Cron plugin, so its table was never created.
    response = admin_client.get("/admin/chancy/cronschedule/", follow=True)
    assert response.redirect_chain == [("/admin/", 302)]
    assert "add the Cron plugin" in response.content.decode()


def test_admin_shows_cron_schedules_once_the_plugin_is_migrated(
    chancy_tables: Chancy, admin_client: Any
) -> None:
    import psycopg

    from chancy.plugins.cron import Cron
    from chancy.store import run

    with_cron = opened(Chancy(chancy_tables.dsn, plugins=[Cron()]))
    with_cron.sync_migrate()
    try:
        Cron.sync_schedule(with_cron, "*/5 * * * *", a_job(7).with_unique_key("every-5-minutes"))
        listed = admin_client.get("/admin/chancy/cronschedule/")
        assert listed.status_code == 200
        assert "every-5-minutes" in listed.content.decode()
        detail = admin_client.get("/admin/chancy/cronschedule/every-5-minutes/change/")
        assert detail.status_code == 200 and "*/5 * * * *" in detail.content.decode()
    finally:
        # Back to no Cron table, as the rest of the session expects.
        with psycopg.connect(chancy_tables.dsn, autocommit=True) as conn, conn.transaction():
            run(conn, with_cron.store.migrate("chancy.cron", "chancy.migrations.cron", 0))
        with_cron.__exit__(None, None, None)


def test_admin_shows_workflows_with_their_steps(chancy_tables: Chancy, admin_client: Any) -> None:
    import asyncio

    from chancy.plugins.workflow import Workflow, WorkflowPlugin

    workflow = (
        Workflow("nightly-report")
        .add("fetch", a_job(1))
        .add("render", Job(func="json.loads", queue="default", kwargs={"s": "1"}), ["fetch"])
    )

    async def push() -> str:
        async with chancy_tables:
            return await WorkflowPlugin.push(chancy_tables, workflow)

    workflow_id = asyncio.run(push())
    listed = admin_client.get("/admin/chancy/workflow/")
    assert listed.status_code == 200 and "nightly-report" in listed.content.decode()
    detail = admin_client.get(f"/admin/chancy/workflow/{workflow_id}/change/").content.decode()
    assert "<td>fetch</td>" in detail and "<td>render</td>" in detail
    assert "<td>json.loads</td>" in detail
