"""Django tasks the tests enqueue."""

from __future__ import annotations

from typing import Any

from django.tasks import TaskContext, task


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="django")
def fail(message: str) -> None:
    raise ValueError(message)


@task(takes_context=True)
def with_context(context: TaskContext, tag: str) -> dict[str, Any]:
    return {"attempt": context.attempt, "id": context.task_result.id, "tag": tag}


@task
async def async_double(value: int) -> int:
    return value * 2


@task(backend="process", queue_name="django-process")
def create_user(username: str) -> dict[str, Any]:
    """Uses the ORM inside a Process executor child (Django set up by the initializer)."""
    import os

    from django.contrib.auth.models import User

    user = User.objects.create(username=username)
    return {"id": user.pk, "pid": os.getpid()}


@task(backend="process", queue_name="django-process")
def fail_then_succeed(marker: str) -> int:
    """Fails on its first attempt (the queue allows two): the result lists one error."""
    from django.contrib.auth.models import User

    if not User.objects.filter(username=marker).exists():
        User.objects.create(username=marker)
        raise RuntimeError("first attempt fails")
    return 2
