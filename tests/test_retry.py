"""RetryPlugin settings (per job, per queue, retry_on / never_retry_on) and Snooze."""

from __future__ import annotations

import pytest

from chancy import Chancy, Job, Queue, Snooze
from chancy.errors import ConfigurationError, JobValidationError
from chancy.plugins.retry import RetryPlugin, retry_settings
from chancy.store import Outcome, arun
from tests.jobs_jobs import FlakyServiceError
from tests.test_worker import ALL_EXECUTORS, serving

FAST = {"backoff": 0, "backoff_jitter": [0, 0]}


def test_settings_merge_plugin_then_queue_then_job() -> None:
    plugin = RetryPlugin(
        backoff=2,
        queue_defaults={"slow": retry_settings(backoff=10, never_retry_on=[KeyError])},
    )
    merged = plugin.settings_for("slow", {"backoff": 7, "unknown": 1})
    assert merged["backoff"] == 7 and merged["never_retry_on"] == ["builtins.KeyError"]
    assert plugin.settings_for("other")["backoff"] == 2
    assert plugin.settings_for("slow")["backoff"] == 10


def test_retry_settings_are_json_ready_and_validated() -> None:
    settings = retry_settings(retry_on=[FlakyServiceError, "TimeoutError"], backoff_jitter=(0, 1))
    assert settings == {
        "retry_on": ["tests.jobs_jobs.FlakyServiceError", "TimeoutError"],
        "backoff_jitter": [0, 1],
    }
    for bad in (
        lambda: retry_settings(retry_on=[int]),  # type: ignore[list-item]
        lambda: retry_settings(backoff=-1),
        lambda: retry_settings(backoff_factor=0.5),
        lambda: retry_settings(backoff_jitter=(3, 1)),
        lambda: RetryPlugin(queue_defaults={"q": {"retry_on": "ValueError"}}),
        lambda: RetryPlugin(queue_defaults={"q": {"backof": 1}}),
    ):
        with pytest.raises(ConfigurationError):
            bad()


def test_matching_by_path_base_class_or_bare_name() -> None:
    plugin = RetryPlugin()
    key_error = ["builtins.KeyError", "builtins.LookupError", "builtins.Exception"]
    assert plugin.should_retry(key_error, {"retry_on": ["builtins.LookupError"]})
    assert plugin.should_retry(key_error, {"retry_on": ["KeyError"]})
    assert not plugin.should_retry(key_error, {"retry_on": ["builtins.ValueError"]})
    assert not plugin.should_retry(key_error, {"never_retry_on": ["LookupError"]})
    # never_retry_on wins over retry_on; an unknown exception is retried.
    both = {"retry_on": ["KeyError"], "never_retry_on": ["KeyError"]}
    assert not plugin.should_retry(key_error, both)
    assert plugin.should_retry(None, {"retry_on": ["KeyError"]})
    assert not plugin.should_retry(["other.KeyError"], {"retry_on": ["builtins.KeyError"]})


def test_delay_survives_huge_attempt_counts() -> None:
    plugin = RetryPlugin(backoff_jitter=[0, 0], backoff_limit=60)
    assert plugin.delay_for(100_000) == 60


@pytest.mark.parametrize("executor", ALL_EXECUTORS)
async def test_retry_on_and_never_retry_on_in_every_executor(dsn: str, executor: str) -> None:
    plugin = RetryPlugin(**FAST)
    async with Chancy(dsn, plugins=[plugin]) as app:
        await app.migrate()
        await app.declare(Queue("q", executor=executor, concurrency=4, polling_interval=0.2))

        def failing(name: str, **settings: object) -> Job:
            return Job(
                func="tests.jobs_jobs.raise_named",
                queue="q",
                kwargs={"name": name},
                max_attempts=3,
                meta={"retry_settings": retry_settings(**settings)},  # type: ignore[arg-type]
            )

        cases = {
            "retried": failing("KeyError", retry_on=[LookupError]),
            "not_listed": failing("ValueError", retry_on=[KeyError]),
            "never": failing("FlakyServiceError", never_retry_on=[FlakyServiceError]),
            "never_base": failing("FlakyServiceError", never_retry_on=[RuntimeError]),
        }
        async with serving(app):
            refs = {name: await app.push(job) for name, job in cases.items()}
            jobs = {name: await app.wait_for_job(ref, timeout=30) for name, ref in refs.items()}
    attempts = {name: (job.state, job.attempts) for name, job in jobs.items() if job}
    assert attempts == {
        "retried": ("failed", 3),
        "not_listed": ("failed", 1),
        "never": ("failed", 1),
        "never_base": ("failed", 1),
    }


async def test_queue_defaults_apply_to_their_queue_and_jobs_override_them(dsn: str) -> None:
    plugin = RetryPlugin(
        **FAST, queue_defaults={"strict": retry_settings(never_retry_on=[ValueError])}
    )
    async with Chancy(dsn, plugins=[plugin]) as app:
        await app.migrate()
        for name in ("strict", "lenient"):
            await app.declare(Queue(name, executor=Chancy.Executor.Async, polling_interval=0.2))
        base = Job(
            func="tests.jobs_jobs.raise_named", kwargs={"name": "ValueError"}, max_attempts=2
        )
        async with serving(app):
            strict = await app.push(base.with_queue("strict"))
            lenient = await app.push(base.with_queue("lenient"))
            override = await app.push(
                base.with_queue("strict").with_meta(
                    {"retry_settings": retry_settings(never_retry_on=[])}
                )
            )
            jobs = [await app.wait_for_job(r, timeout=30) for r in (strict, lenient, override)]
    assert [(j.state, j.attempts) for j in jobs if j] == [
        ("failed", 1),
        ("failed", 2),
        ("failed", 2),
    ]


@pytest.mark.parametrize(
    "executor,func",
    [
        (Chancy.Executor.Async, "tests.jobs_jobs.async_snooze_first"),
        (Chancy.Executor.Async, "tests.jobs_jobs.snooze_first"),
        (Chancy.Executor.Threaded, "tests.jobs_jobs.snooze_first"),
        (Chancy.Executor.Process, "tests.jobs_jobs.snooze_first"),
    ],
)
async def test_snooze_reschedules_without_using_an_attempt(
    chancy: Chancy, executor: str, func: str
) -> None:
    await chancy.declare(Queue("q", executor=executor, polling_interval=0.1))
    async with serving(chancy):
        ref = await chancy.push(Job(func=func, queue="q", kwargs={"delay": 0.5}))
        job = await chancy.wait_for_job(ref, timeout=30)
    assert job is not None and job.state == "succeeded"
    # max_attempts is 1: the snooze did not use it up, and left no error behind.
    assert job.result == 1 and job.attempts == 1 and job.errors == []
    assert job.meta == {"snoozed": True}
    assert job.started_at is not None and job.created_at is not None
    assert (job.started_at - job.created_at).total_seconds() >= 0.5


@pytest.mark.parametrize("delay", [-1, float("nan"), float("inf"), "5", True])
def test_snooze_delay_is_validated(delay: object) -> None:
    with pytest.raises(JobValidationError):
        Snooze(delay)  # type: ignore[arg-type]


async def test_an_absurd_delay_does_not_break_the_completion_batch(chancy: Chancy) -> None:
    await chancy.declare(Queue("q", executor=Chancy.Executor.Async))
    refs = [await chancy.push(Job(func="tests.jobs.noop", queue="q")) for _ in range(3)]
    async with chancy.pool.connection() as conn:
        jobs = await arun(conn, chancy.store.fetch_jobs("q", "w", 10))
        outcomes = [
            Outcome(job, "retrying", delay=delay)
            for job, delay in zip(jobs, [float("nan"), 1e300, -5], strict=True)
        ]
        assert await arun(conn, chancy.store.complete_jobs("w", outcomes)) == set(refs)
    stored = await chancy.get_jobs(refs)
    assert all(job.state == "retrying" for job in stored)
