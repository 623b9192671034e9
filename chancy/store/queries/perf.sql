-- name: perf_push_missing_queues
-- The COPY push checks its queues first: the names among %(queue)s that are not declared.
SELECT q.name AS missing_queue
FROM unnest(%(queue)s::text[]) AS q(name)
WHERE NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)

-- name: perf_push_copy_jobs
-- Bulk push without unique keys: rows stream in with COPY (text format), no arrays to
-- build or unnest and no rows to return (the ids are made client-side). A job due now
-- has scheduled_at 'now', which reads as the transaction's start, as the default does.
COPY {jobs} (
    id, queue, func, kwargs, meta, limits, priority, max_attempts, concurrency_key, scheduled_at
) FROM STDIN

-- name: perf_push_copy_jobs_plain
-- The same for jobs whose other columns all take their defaults (the common case): the
-- server parses four fields a row instead of ten.
COPY {jobs} (id, queue, func, kwargs) FROM STDIN

-- name: perf_push_streamed_check_notify
-- After a streamed COPY, in its transaction: the names among %(queue)s that are not
-- declared, and one NOTIFY per queue that received jobs already due (first_due NULL
-- means "now"). The caller rolls back when a name comes back, which drops the NOTIFY.
WITH notified AS (
    SELECT pg_notify(%(channel)s, json_build_object('e', 'pushed', 'q', d.queue)::text)
    FROM unnest(%(due_queue)s::text[], %(first_due)s::timestamptz[]) AS d(queue, first_due)
    WHERE d.first_due IS NULL OR d.first_due <= now()
)
SELECT q.name AS missing_queue
FROM unnest(%(queue)s::text[]) AS q(name)
WHERE NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)
UNION ALL
SELECT NULL FROM (SELECT count(*) AS n FROM notified) AS c WHERE c.n < 0

-- name: perf_push_notify
-- One NOTIFY per queue that received jobs already due (first_due NULL means "now").
SELECT pg_notify(%(channel)s, json_build_object('e', 'pushed', 'q', d.queue)::text)
FROM unnest(%(queue)s::text[], %(first_due)s::timestamptz[]) AS d(queue, first_due)
WHERE d.first_due IS NULL OR d.first_due <= now()

-- name: perf_push_job_one_plain
-- push_job_one for a job without unique_key: a plain INSERT (no ON CONFLICT, so no
-- speculative insertion and arbiter-index check), same result row.
WITH inserted AS (
    INSERT INTO {jobs} AS j (
        id, queue, func, kwargs, meta, limits, priority, max_attempts, scheduled_at,
        concurrency_key
    )
    SELECT %(id)s, %(queue)s, %(func)s, %(kwargs)s::jsonb, %(meta)s::jsonb, %(limits)s::jsonb,
           %(priority)s, %(max_attempts)s, coalesce(%(scheduled_at)s::timestamptz, now()),
           %(concurrency_key)s
    WHERE NOT %(require_queues)s
       OR EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = %(queue)s)
    RETURNING j.id, j.queue, true AS inserted, j.scheduled_at <= now() AS due
)
SELECT i.id, i.inserted,
       CASE WHEN %(notify)s AND i.due THEN pg_notify(
           %(channel)s, json_build_object('e', 'pushed', 'q', i.queue)::text)::text
       END AS notified
FROM inserted AS i
