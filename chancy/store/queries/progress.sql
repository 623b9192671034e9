-- name: jobs_update_progress_many
-- Writes the latest progress of running jobs, each guarded by its claim like an outcome.
UPDATE {jobs} AS j
SET progress = u.progress::jsonb
FROM unnest(
    %(id)b::uuid[], %(attempt)b::integer[], %(started_at)b::timestamptz[], %(progress)b::text[]
) AS u(id, attempt, started_at, progress)
WHERE j.id = u.id
  AND j.state = 'running'
  AND j.attempts = u.attempt
  AND j.started_at = u.started_at
  AND (j.taken_by = %(worker_id)s) IS TRUE
RETURNING j.id
