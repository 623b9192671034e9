DROP FUNCTION IF EXISTS {fetch_jobs}(text, text, integer);
DROP TABLE IF EXISTS {queue_rates};
DROP INDEX IF EXISTS {jobs_keyed_running_idx};
DROP INDEX IF EXISTS {jobs_keyed_waiting_idx};
ALTER TABLE {queues} DROP COLUMN IF EXISTS concurrency_key_limit;
ALTER TABLE {jobs} DROP COLUMN IF EXISTS concurrency_key;
-- Migration 0002's fetch, restored.
-- The fetch as a function whose planner settings are fixed. On a freshly loaded or
-- churning table, statistics lag behind; with a row estimate of ~1 the planner prefers a
-- bitmap scan plus a sort of the whole backlog (tens of milliseconds at 150k pending
-- jobs) over walking the fetch index in order (under a millisecond). Disabling bitmap
-- scans and sorts here leaves the ordered index scan as the only cheap plan.
CREATE FUNCTION {fetch_jobs}(p_queue text, p_worker_id text, p_limit integer)
RETURNS TABLE (
    id uuid, queue text, func text, kwargs jsonb, meta jsonb, limits jsonb,
    priority smallint, state text, attempts integer, max_attempts integer,
    unique_key text, taken_by text, created_at timestamptz, scheduled_at timestamptz,
    started_at timestamptz
)
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_sort = off
AS $body$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE {jobs} AS j
    SET state = 'running', attempts = j.attempts + 1, taken_by = p_worker_id,
        started_at = now()
    WHERE j.id = ANY(ARRAY(
        SELECT c.id
        FROM {jobs} AS c
        WHERE c.queue = p_queue
          AND c.state IN ('pending', 'retrying')
          AND c.scheduled_at <= now()
        ORDER BY c.priority DESC, c.scheduled_at, c.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ))
    -- Empty meta and limits come back as NULL: nothing to decode for most jobs.
    RETURNING j.id, j.queue, j.func, j.kwargs, nullif(j.meta, '{{}}'::jsonb),
              nullif(j.limits, '[]'::jsonb), j.priority, j.state,
              j.attempts, j.max_attempts, j.unique_key, j.taken_by, j.created_at,
              j.scheduled_at, j.started_at;
END
$body$;
