"""A ``django.tasks`` backend (Django 6+) that runs tasks on Chancy workers::

    TASKS = {
        "default": {
            "BACKEND": "chancy.contrib.django.tasks.ChancyBackend",
            "QUEUES": ["default", "emails"],
            "OPTIONS": {"max_attempts": 3},
        }
    }

``OPTIONS`` (all optional): ``dsn`` (default: the ``database`` alias's settings),
``database`` (the Django alias whose connection and transaction ``enqueue`` uses; default
``"default"``), ``prefix``, ``executor`` (``"Process"``, ``"Threaded"``, ``"Async"`` or an
import path; default Process), ``concurrency``, ``max_attempts`` (default 1) and
``chancy_options`` (more :class:`~chancy.Chancy` keyword arguments).

``enqueue`` inserts the job on Django's own connection, so inside ``transaction.atomic``
the task exists only if the transaction commits. Run workers with
``manage.py chancy worker start``; results are read back with ``get_result``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from asgiref.sync import sync_to_async
from django.db import close_old_connections, connections
from django.tasks import TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import Task, TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from chancy.app import Chancy
from chancy.errors import ChancyError
from chancy.job import Job, QueuedJob, Reference
from chancy.queue import Queue

from . import database_dsn, opened, raw_connection

__all__ = ["ChancyBackend", "run_task"]

#: The Chancy job function every task runs through.
RUNNER = "chancy.contrib.django.tasks.run_task"
#: Process executor children set Django up with this initializer.
CHILD_INITIALIZER = "chancy.contrib.django.setup_child"

STATUS = {
    QueuedJob.State.PENDING: TaskResultStatus.READY,
    QueuedJob.State.RETRYING: TaskResultStatus.READY,
    QueuedJob.State.RUNNING: TaskResultStatus.RUNNING,
    QueuedJob.State.SUCCEEDED: TaskResultStatus.SUCCESSFUL,
    QueuedJob.State.FAILED: TaskResultStatus.FAILED,
    QueuedJob.State.CANCELLED: TaskResultStatus.FAILED,
}
_apps: dict[tuple[str, str, str], Chancy] = {}
_apps_lock = threading.Lock()
_EXCEPTION_RE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


class ChancyBackend(BaseTaskBackend):
    """Enqueue Django tasks as Chancy jobs; results come from the jobs table."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = {str(key).lower(): value for key, value in self.options.items()}
        self.database: str = options.get("database", "default")
        self.explicit_dsn = options.get("dsn")
        self.executor = _executor_path(options.get("executor", "Process"))
        self.concurrency: int | None = options.get("concurrency")
        self.max_attempts = int(options.get("max_attempts", 1))
        self.prefix: str = options.get("prefix", "chancy_")
        self.chancy_options: dict[str, Any] = dict(options.get("chancy_options") or {})
        self._chancy: Chancy | None = None

    # -- the Chancy behind the backend -------------------------------------------------

    @property
    def chancy(self) -> Chancy:
        """The backend's :class:`Chancy`, built on first use and shared by every instance
        of this backend in the process (Django makes one per thread): one set of pools."""
        if self._chancy is None:
            dsn = self.explicit_dsn or database_dsn(connections[self.database].settings_dict)
            options: dict[str, Any] = {"prefix": self.prefix, "require_declared_queues": False}
            options.update(self.chancy_options)
            key = (self.alias, dsn, repr(sorted(options.items())))
            with _apps_lock:
                app = _apps.get(key)
                if app is None:
                    app = _apps[key] = Chancy(dsn, **options)
            self._chancy = app
        return self._chancy

    def queue_definitions(self) -> list[Queue]:
        """The queues a worker for this backend serves (declared by ``manage.py chancy
        worker start`` unless they exist already)."""
        executor_options: dict[str, Any] = {}
        if self.executor == Chancy.Executor.Process:
            executor_options["initializer"] = CHILD_INITIALIZER
        return [
            Queue(
                name,
                executor=self.executor,
                concurrency=self.concurrency,
                executor_options=executor_options,
            )
            for name in sorted(self.queues)
        ]

    def declare_queues(self, *, upsert: bool = False) -> list[Queue]:
        """Declare :meth:`queue_definitions` (keeping existing settings unless ``upsert``)."""
        with psycopg.connect(self.chancy.dsn, autocommit=True) as conn:
            return [
                self.chancy.sync_declare_ex(conn, queue, upsert=upsert)
                for queue in self.queue_definitions()
            ]

    # -- enqueue -----------------------------------------------------------------------

    def job_for(self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Job:
        """The Chancy job that runs ``task(*args, **kwargs)``."""
        return Job(
            func=RUNNER,
            queue=task.queue_name,
            kwargs={
                "task": task.module_path,
                "args": list(args),
                "kwargs": dict(kwargs),
                "backend": self.alias,
            },
            priority=task.priority,
            max_attempts=self.max_attempts,
            scheduled_at=task.run_after,
            meta={"django_task": task.module_path},
        )

    def enqueue(self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> TaskResult:
        self.validate_task(task)
        job = self.job_for(task, normalize_json(list(args)), normalize_json(dict(kwargs)))
        if self.explicit_dsn is None and connections[self.database].vendor == "postgresql":
            ref = self.chancy.sync_push_ex(raw_connection(self.database), job)
        else:
            ref = opened(self.chancy).sync_push(job)
        result = TaskResult(
            task=task,
            id=str(ref),
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=list(job.kwargs["args"]),
            kwargs=dict(job.kwargs["kwargs"]),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    async def aenqueue(
        self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> TaskResult:
        return await sync_to_async(self.enqueue, thread_sensitive=True)(task, args, kwargs)

    # -- results -----------------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult:
        try:
            ref = Reference(result_id)
        except ChancyError:
            raise TaskResultDoesNotExist(result_id) from None
        job = opened(self.chancy).sync_get_job(ref)
        if job is None or job.func != RUNNER:
            raise TaskResultDoesNotExist(result_id)
        return self.result_from_job(job)

    def result_from_job(self, job: QueuedJob, task: Task | None = None) -> TaskResult:
        """The :class:`TaskResult` of a stored (or running) job."""
        if task is None:
            task = load_task(job.kwargs["task"])
        status = STATUS[job.state]
        finished = (
            job.completed_at
            if status
            in (
                TaskResultStatus.SUCCESSFUL,
                TaskResultStatus.FAILED,
            )
            else None
        )
        result = TaskResult(
            task=task,
            id=str(job.id),
            status=status,
            enqueued_at=job.created_at,
            started_at=job.started_at,
            finished_at=finished,
            last_attempted_at=job.started_at,
            args=list(job.kwargs.get("args", [])),
            kwargs=dict(job.kwargs.get("kwargs", {})),
            backend=self.alias,
            errors=[_task_error(error) for error in job.errors],
            worker_ids=[job.taken_by or ""] * job.attempts,
        )
        if status is TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", job.result)
        return result

    def check(self, **kwargs: Any) -> list[Any]:
        from django.core import checks

        messages = list(super().check(**kwargs))
        if self.explicit_dsn is None:
            settings_dict = connections.settings.get(self.database)
            engine = (settings_dict or {}).get("ENGINE", "")
            if "postgresql" not in engine:
                messages.append(
                    checks.Error(
                        f"TASKS[{self.alias!r}] needs a PostgreSQL database: "
                        f"DATABASES[{self.database!r}] uses {engine or 'nothing'}",
                        hint='Set OPTIONS["dsn"] or OPTIONS["database"].',
                        id="chancy.E001",
                    )
                )
        return messages


def load_task(path: str) -> Task:
    """Import the :class:`~django.tasks.Task` at ``path`` (a ``@task`` function)."""
    try:
        task = import_string(path)
    except ImportError as exc:
        raise InvalidTask(f"cannot import task {path}: {exc}") from exc
    if not isinstance(task, Task):
        raise InvalidTask(f"{path} is not a Task (decorate it with @task)")
    return task


def _executor_path(name: str) -> str:
    try:
        return str(Chancy.Executor[name])
    except KeyError:
        return name


def _task_error(error: Mapping[str, Any]) -> TaskError:
    traceback = str(error.get("traceback") or "")
    lines = [line for line in traceback.strip().splitlines() if line.strip()]
    match = _EXCEPTION_RE.match(lines[-1]) if lines else None
    path = match.group(1) if match else "Exception"
    if "." not in path:
        path = f"builtins.{path}"
    return TaskError(exception_class_path=path, traceback=traceback)


def run_task(
    *,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    backend: str,
    job: QueuedJob,
) -> Any:
    """The Chancy job behind every Django task: call it and return its JSON result."""
    from django.tasks import task_backends

    the_task = load_task(task)
    chancy_backend = task_backends[backend]
    running = dataclasses.replace(
        job,
        state=QueuedJob.State.RUNNING,
        started_at=job.started_at or dt.datetime.now(dt.UTC),
    )
    result = chancy_backend.result_from_job(running, the_task)
    task_started.send(type(chancy_backend), task_result=result)
    close_old_connections()
    try:
        if the_task.takes_context:
            value = the_task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = the_task.call(*args, **kwargs)
        value = normalize_json(value)
    except BaseException as exc:
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        object.__setattr__(result, "finished_at", timezone.now())
        result.errors.append(
            TaskError(
                exception_class_path=f"{type(exc).__module__}.{type(exc).__qualname__}",
                traceback="",
            )
        )
        task_finished.send(type(chancy_backend), task_result=result)
        raise
    finally:
        close_old_connections()
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", value)
    task_finished.send(type(chancy_backend), task_result=result)
    return value
