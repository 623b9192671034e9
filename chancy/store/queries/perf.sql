-- name: perf_push_missing_queues
-- The COPY push checks its queues first: the names among %(queue)s that are not declared.
SELECT q.name AS missing_queue
FROM unnest(%(queue)s::text[]) AS q(name)
WHERE NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)

-- name: perf_push_copy_jobs
-- Bulk push without unique keys: rows stream in with COPY (text format), no arrays to
-- build or unnest and no rows to return (the ids are made client-side).
COPY {jobs} (id, queue, func, kwargs, meta, limits, priority, max_attempts, scheduled_at)
FROM STDIN

-- name: perf_push_copy_jobs_due_now
-- The same for jobs without scheduled_at: the column default (now()) applies.
COPY {jobs} (id, queue, func, kwargs, meta, limits, priority, max_attempts) FROM STDIN

-- name: perf_push_notify
-- One NOTIFY per queue that received jobs already due (first_due NULL means "now").
SELECT pg_notify(%(channel)s, json_build_object('e', 'pushed', 'q', d.queue)::text)
FROM unnest(%(queue)s::text[], %(first_due)s::timestamptz[]) AS d(queue, first_due)
WHERE d.first_due IS NULL OR d.first_due <= now()
