"""Read-only admin pages for Chancy's jobs, queues and workers."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db import connections, router
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from .models import CronSchedule, Job, Queue, Worker, Workflow


class ReadOnlyAdmin(admin.ModelAdmin):
    """Chancy's tables change through its API only: the admin views, never edits."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ("id", "func", "queue", "state", "priority", "attempts", "created_at")
    list_filter = ("state", "queue")
    search_fields = ("=id", "func", "unique_key")
    date_hierarchy = "created_at"
    show_full_result_count = False  # counting a big jobs table is slow
    exclude = ("errors",)
    readonly_fields = ("tracebacks",)

    def tracebacks(self, obj: Job) -> str:
        """Each failed attempt's traceback, readable."""
        errors = obj.errors if isinstance(obj.errors, list) else json.loads(obj.errors or "[]")
        if not errors:
            return "-"
        return str(
            format_html_join(
                "",
                "<p>attempt {}</p><pre>{}</pre>",
                ((error.get("attempt"), error.get("traceback", "")) for error in errors),
            )
        )


@admin.register(Queue)
class QueueAdmin(ReadOnlyAdmin):
    list_display = ("name", "state", "executor", "concurrency", "polling_interval")
    list_filter = ("state",)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ("worker_id", "hostname", "pid", "last_seen", "expires_at")


class PluginTableAdmin(ReadOnlyAdmin):
    """For a plugin's table, which exists only once that plugin has been migrated."""

    plugin = ""

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        table = self.model._meta.db_table
        connection = connections[router.db_for_read(self.model)]
        with connection.cursor() as cursor:
            exists = table in connection.introspection.table_names(cursor)
        if not exists:
            self.message_user(
                request,
                f"There is no {table} table: add the {self.plugin} plugin to your Chancy "
                "and run `manage.py chancy misc migrate`.",
                level=messages.WARNING,
            )
            return HttpResponseRedirect(reverse("admin:index"))
        return super().changelist_view(request, extra_context)


@admin.register(CronSchedule)
class CronScheduleAdmin(PluginTableAdmin):
    plugin = "Cron"
    list_display = ("unique_key", "cron", "timezone", "next_run", "last_run")
    search_fields = ("unique_key",)


@admin.register(Workflow)
class WorkflowAdmin(PluginTableAdmin):
    plugin = "WorkflowPlugin"
    list_display = ("id", "name", "state", "created_at", "completed_at")
    list_filter = ("state",)
    search_fields = ("=id", "name")
    readonly_fields = ("step_table",)

    def step_table(self, obj: Workflow) -> str:
        """The workflow's steps in order, with their state, dependencies and job."""
        rows = (
            (
                step.step_id,
                step.state,
                ", ".join(step.dependencies) or "-",
                (step.job or {}).get("func", ""),
                step.job_id or "-",
            )
            for step in obj.steps.all()
        )
        body = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows
        )
        return str(
            format_html(
                "<table><tr><th>step</th><th>state</th><th>after</th><th>function</th>"
                "<th>job</th></tr>{}</table>",
                body,
            )
        )
