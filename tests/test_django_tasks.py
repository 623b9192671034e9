"""The django.tasks backend: @task + .enqueue() runs on Chancy workers, with results,
errors, context, priorities, deferral, transactions and signals (Django 6, Python 3.12+:
scripts/test-django runs this file)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.tasks import TaskResultStatus, default_task_backend, task_backends
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started

from chancy import Chancy
from chancy.contrib.django import get_chancy, opened
from chancy.contrib.django.tasks import RUNNER, ChancyBackend
from tests.django_project import tasks
from tests.django_project.helpers import work_until_finished

pytest_plugins = ["tests.django_project.fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def test_enqueue_runs_on_a_worker_and_reports_the_result(chancy_tables: Chancy) -> None:
    result = tasks.add.enqueue(2, b=3)
    assert result.status == TaskResultStatus.READY and result.backend == "default"
    assert result.args == [2] and result.kwargs == {"b": 3}
    with pytest.raises(ValueError, match="not finished"):
        result.return_value  # noqa: B018
    pending = tasks.add.get_result(result.id)
    assert pending.status == TaskResultStatus.READY and pending.enqueued_at is not None
    [job] = work_until_finished(chancy_tables, [result.id])
    assert job.func == RUNNER and job.meta["django_task"] == tasks.add.module_path
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.is_finished
    assert result.return_value == 5
    assert result.started_at is not None and result.finished_at is not None
    assert result.finished_at >= result.started_at >= result.enqueued_at  # type: ignore[operator]
    assert result.attempts == 1 and result.worker_ids == [job.taken_by]
    assert default_task_backend.get_result(result.id).return_value == 5


def test_failures_keep_the_exception_class_and_traceback(chancy_tables: Chancy) -> None:
    result = tasks.fail.enqueue("boom")
    work_until_finished(chancy_tables, [result.id])
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == "builtins.ValueError"
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018


def test_context_async_tasks_and_retries_in_process_children(chancy_tables: Chancy) -> None:
    contextual = tasks.with_context.enqueue(tag="t")
    doubled = tasks.async_double.enqueue(21)
    created = tasks.create_user.enqueue("from-child")
    retried = tasks.fail_then_succeed.enqueue("marker")
    work_until_finished(chancy_tables, [r.id for r in (contextual, doubled, created, retried)])
    assert tasks.with_context.get_result(contextual.id).return_value == {
        "attempt": 1,
        "id": contextual.id,
        "tag": "t",
    }
    assert tasks.async_double.get_result(doubled.id).return_value == 42
    made = tasks.create_user.get_result(created.id).return_value
    assert User.objects.get(pk=made["id"]).username == "from-child"
    final = tasks.fail_then_succeed.get_result(retried.id)
    assert final.status == TaskResultStatus.SUCCESSFUL and final.return_value == 2
    assert final.attempts == 2
    assert [e.exception_class_path for e in final.errors] == ["builtins.RuntimeError"]


def test_priority_defer_and_validation(chancy_tables: Chancy) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    result = tasks.add.using(priority=7, run_after=later, queue_name="django").enqueue(1, 1)
    job = opened(chancy_tables).sync_get_job(result.id)
    assert job is not None and job.priority == 7 and job.queue == "django"
    assert job.scheduled_at == later
    assert tasks.add.get_result(result.id).status == TaskResultStatus.READY
    backend = task_backends["default"]
    assert isinstance(backend, ChancyBackend)
    assert backend.supports_defer and backend.supports_priority
    assert backend.supports_get_result and backend.supports_async_task
    with pytest.raises(InvalidTask, match="Queue"):
        tasks.add.using(queue_name="elsewhere")
    with pytest.raises(InvalidTask, match="priority"):
        tasks.add.using(priority=101)
    with pytest.raises(InvalidTask, match="aware"):
        tasks.add.using(run_after=dt.datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        tasks.add.enqueue(object(), 1)
    for missing in ("not-a-uuid", "01890000-0000-7000-8000-000000000000"):
        with pytest.raises(TaskResultDoesNotExist):
            tasks.add.get_result(missing)


def test_enqueue_joins_the_django_transaction(chancy_tables: Chancy) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = tasks.add.enqueue(1, 2)
        raise RuntimeError("roll back")
    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result(rolled_back.id)
    with transaction.atomic():
        committed = tasks.add.enqueue(1, 2)
    assert tasks.add.get_result(committed.id).status == TaskResultStatus.READY


def test_aenqueue_signals_and_get_chancy(chancy_tables: Chancy) -> None:
    seen: list[tuple[str, Any]] = []

    def receiver(name: str) -> Any:
        def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
            seen.append((name, task_result.status))

        return receive

    handlers = {
        signal: receiver(name)
        for name, signal in (
            ("enqueued", task_enqueued),
            ("started", task_started),
            ("finished", task_finished),
        )
    }
    for signal, handler in handlers.items():
        signal.connect(handler)
    try:
        result = asyncio.run(tasks.add.aenqueue(4, 4))
        work_until_finished(chancy_tables, [result.id])
    finally:
        for signal, handler in handlers.items():
            signal.disconnect(handler)
    assert seen == [
        ("enqueued", TaskResultStatus.READY),
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
    ]
    assert asyncio.run(tasks.add.aget_result(result.id)).return_value == 8
    assert get_chancy() is task_backends["default"].chancy


def test_backend_instances_of_other_threads_share_one_chancy(chancy_tables: Chancy) -> None:
    import threading

    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(task_backends["default"]))
    thread.start()
    thread.join()
    assert seen[0] is not task_backends["default"]  # Django makes one per thread
    assert seen[0].chancy is task_backends["default"].chancy
