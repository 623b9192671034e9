-- Records many outcomes in one call (Store.complete_jobs). Each row is guarded by its claim
-- (id, attempt, claim time, worker, still running): a late outcome from a worker that lost
-- the job, or one written twice, changes nothing. One NOTIFY for the whole batch wakes
-- result waiters; it names the jobs (never their data) when there are few enough to fit a
-- payload. A column that is NULL (or 0) for every outcome may be passed as one NULL
-- instead of an array: unnest pads it. Returns the ids whose claim held when p_held.
--
-- A function for its planner settings (as the fetch in 0002): outcomes must be looked up
-- by primary key, one probe each. As a plain statement on a table without fresh
-- statistics, the planner drove the join from the running-jobs index (or a sequential
-- scan) and rescanned the outcomes for every running row: 200 outcomes against 200
-- running jobs cost 40,000 comparisons, 13-20 ms instead of about 1.4 ms.
CREATE FUNCTION {complete_jobs}(
    p_worker_id text, p_id uuid[], p_attempt integer[], p_state text[], p_delay float8[],
    p_refund integer[], p_error text[], p_meta text[], p_result text[], p_progress text[],
    p_started_at timestamptz[], p_notify boolean, p_channel text, p_held boolean
)
RETURNS SETOF uuid
LANGUAGE sql
VOLATILE
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $body$
WITH done AS (
    UPDATE {jobs} AS j
    SET state = o.state,
        completed_at = CASE WHEN o.state IN ('succeeded', 'failed', 'cancelled') THEN now() END,
        scheduled_at = CASE
            WHEN o.state IN ('pending', 'retrying')
                THEN now() + make_interval(secs => coalesce(o.delay, 0))
            ELSE j.scheduled_at END,
        attempts = j.attempts - coalesce(o.refund, 0),
        errors = CASE WHEN o.error IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(o.error::jsonb) END,
        meta = coalesce(o.meta::jsonb, j.meta),
        result = o.result::jsonb,
        progress = coalesce(o.progress::jsonb, j.progress)
    FROM (
        SELECT *
        FROM unnest(
            p_id, p_attempt, p_state, p_delay, p_refund, p_error, p_meta, p_result,
            p_progress, p_started_at
        ) AS u(id, attempt, state, delay, refund, error, meta, result, progress, started_at)
        OFFSET 0
    ) AS o
    WHERE j.id = o.id
      -- Written so that no partial index on running jobs or on taken_by can serve it.
      AND (j.state = 'running') IS TRUE
      AND j.attempts = o.attempt
      -- started_at is set at claim: it tells this claim from a later one by the same
      -- worker at the same attempt count (after a refund).
      AND j.started_at = o.started_at
      AND (j.taken_by = p_worker_id) IS TRUE
    RETURNING j.id
), notified AS (
    SELECT pg_notify(p_channel, json_build_object(
        'e', 'done', 'j', CASE WHEN count(*) <= 100 THEN json_agg(d.id) END)::text)
    FROM done AS d
    HAVING p_notify AND count(*) > 0
)
SELECT d.id FROM done AS d WHERE p_held
UNION ALL
SELECT NULL FROM (SELECT count(*) AS n FROM notified) AS c WHERE c.n < 0
$body$;

-- Writes the latest progress of running jobs, each guarded by its claim like an outcome
-- (Store.update_progress); returns the ids whose claim held. A function for the same
-- planner settings: a progress batch is looked up by primary key, never by rescanning
-- it for every running job.
CREATE FUNCTION {update_progress}(
    p_worker_id text, p_id uuid[], p_attempt integer[], p_started_at timestamptz[],
    p_progress text[]
)
RETURNS SETOF uuid
LANGUAGE sql
VOLATILE
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $body$
UPDATE {jobs} AS j
SET progress = u.progress::jsonb
FROM (
    SELECT * FROM unnest(p_id, p_attempt, p_started_at, p_progress)
        AS v(id, attempt, started_at, progress)
    OFFSET 0
) AS u
WHERE j.id = u.id
  AND (j.state = 'running') IS TRUE
  AND j.attempts = u.attempt
  AND j.started_at = u.started_at
  AND (j.taken_by = p_worker_id) IS TRUE
RETURNING j.id
$body$;
