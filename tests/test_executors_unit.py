"""Executor building blocks that need no database."""

from __future__ import annotations

import sys
import threading

import pytest

from chancy.errors import JobImportError, UnsupportedExecutorError
from chancy.executors.base import import_function, job_parameter
from chancy.executors.thread import ElasticThreadPool


def test_subinterpreter_executor_names_its_requirement() -> None:
    from chancy.executors.sub import require_subinterpreters

    if sys.version_info >= (3, 13):
        require_subinterpreters()  # available: no error
    else:
        with pytest.raises(UnsupportedExecutorError, match=r"3\.13"):
            require_subinterpreters()


def test_import_function_paths() -> None:
    from tests import jobs

    assert import_function("tests.jobs.add") is jobs.add
    assert import_function("tests.jobs:add") is jobs.add
    with pytest.raises(JobImportError, match="no_such"):
        import_function("tests.jobs.no_such")
    with pytest.raises(JobImportError):
        import_function("no_such_module_xyz.f")
    with pytest.raises(JobImportError):
        import_function("tests.jobs.EVENTS")


def test_job_parameter_detection() -> None:
    from tests import jobs

    assert job_parameter(jobs.with_job) == "job"
    assert job_parameter(jobs.add) is None


def test_elastic_pool_grows_past_stuck_threads() -> None:
    pool = ElasticThreadPool("t", idle_timeout=0.5)
    release = threading.Event()
    done = threading.Event()
    for _ in range(3):
        pool.submit(release.wait)
    pool.submit(done.set)
    assert done.wait(5)
    release.set()
    pool.shutdown()
