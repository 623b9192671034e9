"""Read-only admin pages for Chancy's jobs, queues and workers."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html_join

from .models import Job, Queue, Worker


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
