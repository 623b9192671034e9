-- name: eco_select_due_queues
-- Queues holding jobs that a worker could fetch now (chancy.testing.run_pending).
SELECT DISTINCT queue
FROM {jobs}
WHERE state IN ('pending', 'retrying') AND scheduled_at <= now()
ORDER BY queue

-- name: eco_select_jobs_matching
-- Jobs filtered by function, queue, states and a kwargs subset, oldest first
-- (chancy.testing.assert_pushed). A NULL filter matches everything.
SELECT id, queue, func, kwargs, meta, limits, priority, state, attempts, max_attempts,
       unique_key, taken_by, errors, result, created_at, scheduled_at, started_at,
       completed_at
FROM {jobs}
WHERE (%(func)s::text IS NULL OR func = %(func)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
  AND (%(kwargs)s::jsonb IS NULL OR kwargs @> %(kwargs)s::jsonb)
ORDER BY id
LIMIT %(limit)s
