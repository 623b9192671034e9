-- name: jobs_update_progress_many
-- Writes the latest progress of running jobs, each guarded by its claim like an outcome
-- (migration 0005 explains the function).
SELECT id FROM {update_progress}(
    %(worker_id)s, %(id)b::uuid[], %(attempt)b::integer[], %(started_at)b::timestamptz[],
    %(progress)b::text[]
) AS id
