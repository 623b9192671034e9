"""Settings of the Django project the Django integration tests run against.

The database is the test server; every test run gets a schema of its own (through the
connection's search_path), created and dropped by the ``django_db_setup`` fixture. The
schema name travels in the environment, so worker child processes see the same one.
"""

from __future__ import annotations

import os
import uuid

from psycopg.conninfo import conninfo_to_dict

SCHEMA = os.environ.setdefault("CHANCY_DJANGO_SCHEMA", f"dj_{uuid.uuid4().hex[:12]}")
_server = conninfo_to_dict(
    os.environ.get("CHANCY_TEST_DSN") or "host=/var/run/postgresql dbname=test user=postgres"
)

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "chancy.contrib.django",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _server.get("dbname", "test"),
        "USER": _server.get("user", "postgres"),
        "PASSWORD": _server.get("password", ""),
        "HOST": _server.get("host", ""),
        "PORT": _server.get("port", ""),
        # A Django-only option next to a libpq one: the Chancy DSN must keep only the latter.
        "OPTIONS": {"options": f"-c search_path={SCHEMA}", "server_side_binding": False},
        "TEST": {"NAME": _server.get("dbname", "test")},
    }
}
TASKS = {
    "default": {
        "BACKEND": "chancy.contrib.django.tasks.ChancyBackend",
        "QUEUES": ["default", "django"],
        "OPTIONS": {"executor": "Threaded", "concurrency": 2},
    },
    "process": {
        "BACKEND": "chancy.contrib.django.tasks.ChancyBackend",
        "QUEUES": ["django-process"],
        "OPTIONS": {"executor": "Process", "concurrency": 1, "max_attempts": 2},
    },
}
