"""Unmanaged models over Chancy's tables, for the admin and ad-hoc ORM queries. Chancy
owns the schema (``manage.py chancy misc migrate``); Django never creates or alters it.
Write through :class:`~chancy.Chancy`'s API, not these models."""

from __future__ import annotations

from typing import Any

from django.contrib.postgres.fields import ArrayField
from django.db import models


def table_prefix() -> str:
    """The table prefix of the project's Chancy (``TASKS`` backend or ``settings.CHANCY``)."""
    from django.conf import settings

    for params in (getattr(settings, "TASKS", None) or {}).values():
        if str(params.get("BACKEND", "")).startswith("chancy.contrib.django"):
            options = {str(k).lower(): v for k, v in (params.get("OPTIONS") or {}).items()}
            return str(options.get("prefix", "chancy_"))
    config: dict[str, Any] = getattr(settings, "CHANCY", None) or {}
    return str(config.get("PREFIX", "chancy_"))


STATES = [
    (state, state.capitalize())
    for state in ("pending", "running", "retrying", "succeeded", "failed", "cancelled")
]


class Job(models.Model):
    """A row of the jobs table."""

    id = models.UUIDField(primary_key=True)
    queue = models.TextField()
    func = models.TextField()
    kwargs = models.JSONField(default=dict)
    meta = models.JSONField(default=dict)
    limits = models.JSONField(default=list)
    priority = models.SmallIntegerField(default=0)
    state = models.TextField(choices=STATES)
    attempts = models.IntegerField(default=0)
    max_attempts = models.IntegerField(default=1)
    unique_key = models.TextField(null=True)
    taken_by = models.TextField(null=True)
    errors = models.JSONField(default=list)
    result = models.JSONField(null=True)
    created_at = models.DateTimeField()
    scheduled_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True)
    completed_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = f"{table_prefix()}jobs"
        ordering = ["-id"]
        verbose_name = "job"

    def __str__(self) -> str:
        return f"{self.func} ({self.state}) {self.id}"


class Queue(models.Model):
    """A row of the queues table."""

    name = models.TextField(primary_key=True)
    state = models.TextField()
    concurrency = models.IntegerField(null=True)
    tags = ArrayField(models.TextField())
    executor = models.TextField()
    executor_options = models.JSONField(default=dict)
    polling_interval = models.FloatField()
    rate_limit = models.IntegerField(null=True)
    rate_limit_window = models.IntegerField(null=True)
    resume_at = models.DateTimeField(null=True)
    eager_polling = models.BooleanField(default=False)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = f"{table_prefix()}queues"
        ordering = ["name"]

    def __str__(self) -> str:
        return str(self.name)


class Worker(models.Model):
    """A row of the workers table (live and recently dead workers)."""

    worker_id = models.TextField(primary_key=True)
    hostname = models.TextField()
    pid = models.IntegerField()
    tags = ArrayField(models.TextField())
    queues = ArrayField(models.TextField())
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = f"{table_prefix()}workers"
        ordering = ["worker_id"]

    def __str__(self) -> str:
        return f"{self.worker_id} on {self.hostname}"


class CronSchedule(models.Model):
    """A row of the Cron plugin's schedules table (exists once the plugin is migrated)."""

    unique_key = models.TextField(primary_key=True)
    job = models.JSONField()
    cron = models.TextField()
    timezone = models.TextField()
    catch_up = models.IntegerField()
    last_run = models.DateTimeField(null=True)
    next_run = models.DateTimeField(null=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = f"{table_prefix()}cron"
        ordering = ["unique_key"]
        verbose_name = "cron schedule"

    def __str__(self) -> str:
        return f"{self.unique_key} ({self.cron})"


class Workflow(models.Model):
    """A row of the workflow plugin's workflows table."""

    id = models.UUIDField(primary_key=True)
    name = models.TextField()
    state = models.TextField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = f"{table_prefix()}workflows"
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"


class WorkflowStep(models.Model):
    """A row of the workflow steps table. Its real key is (workflow, step_id): read steps
    through ``workflow.steps`` only."""

    workflow = models.ForeignKey(
        Workflow, on_delete=models.DO_NOTHING, db_column="workflow_id", related_name="steps"
    )
    step_id = models.TextField(primary_key=True)
    group_id = models.TextField(null=True)
    position = models.IntegerField()
    job = models.JSONField()
    dependencies = ArrayField(models.TextField())
    state = models.TextField()
    job_id = models.UUIDField(null=True)
    started_at = models.DateTimeField(null=True)
    completed_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = f"{table_prefix()}workflow_steps"
        ordering = ["position"]

    def __str__(self) -> str:
        return f"{self.step_id} ({self.state})"
