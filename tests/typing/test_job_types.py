"""Static typing contract of ``@job``: checked by ``mypy --strict`` (and pyright) in
scripts/check, so that a change which loses the ``ParamSpec`` fails CI.

Lines marked ``# type: ignore[<code>]`` are deliberate errors: mypy's
``warn_unused_ignores`` (part of ``--strict``) fails the check if one of them stops being
an error. The runtime test at the bottom keeps pytest collecting the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from chancy import Job, JobFunction, job


@job
def add(a: int, b: int = 1) -> int:
    return a + b


@job(queue="emails", max_attempts=3)
async def send(*, to: str, subject: str) -> bool:
    return bool(to and subject)


def check_types() -> None:
    as_callable: Callable[[int, int], int] = add
    as_function: JobFunction[..., int] = add
    del as_callable, as_function
    assert_type(add(1, 2), int)
    assert_type(add.job, Job)
    assert_type(add.bind(1, b=2), Job)
    assert_type(send.job, Job)

    add("one")  # type: ignore[arg-type]
    add.bind(a="x")  # type: ignore[arg-type]
    add.bind(1, c=3)  # type: ignore[call-arg]
    send.bind(to=1, subject="s")  # type: ignore[arg-type]
    send.bind("a", "b")  # type: ignore[call-arg]
    bad: Callable[[str], int] = add  # type: ignore[assignment]
    del bad
    wrong: str = add(1)  # type: ignore[assignment]
    del wrong


def test_decorated_functions_still_run() -> None:
    assert add(1, 2) == 3
    assert add.bind(2).kwargs == {"a": 2}
    assert add.job.func == f"{__name__}.add"
    assert send.job.queue == "emails"
