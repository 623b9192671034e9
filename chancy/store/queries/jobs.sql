-- name: push_jobs_many
-- One statement for any number of jobs. Nothing is inserted when a queue is unknown (the
-- missing names come back instead); a live duplicate unique_key returns the live job's id.
-- One NOTIFY per queue that received jobs which are already due.
WITH missing AS (
    SELECT DISTINCT q.name
    FROM unnest(%(queue)b::text[]) AS q(name)
    WHERE %(require_queues)s
      AND NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)
), inserted AS (
    INSERT INTO {jobs} AS j (
        id, queue, func, kwargs, meta, limits, priority, max_attempts, unique_key, scheduled_at,
        concurrency_key
    )
    SELECT i.id, i.queue, i.func, i.kwargs::jsonb, i.meta::jsonb, i.limits::jsonb, i.priority,
           i.max_attempts, i.unique_key, coalesce(i.scheduled_at, now()), i.concurrency_key
    FROM unnest(
        %(id)b::uuid[], %(queue)b::text[], %(func)b::text[], %(kwargs)b::text[],
        %(meta)b::text[], %(limits)b::text[], %(priority)b::smallint[],
        %(max_attempts)b::integer[], %(unique_key)b::text[], %(scheduled_at)b::timestamptz[],
        %(concurrency_key)b::text[]
    ) AS i(id, queue, func, kwargs, meta, limits, priority, max_attempts, unique_key,
           scheduled_at, concurrency_key)
    WHERE NOT EXISTS (SELECT 1 FROM missing)
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'running', 'retrying')
        DO UPDATE SET unique_key = EXCLUDED.unique_key
    RETURNING j.id, j.queue, j.unique_key, (j.xmax = 0) AS inserted, j.scheduled_at <= now() AS due
), notified AS (
    SELECT pg_notify(%(channel)s, json_build_object('e', 'pushed', 'q', d.queue)::text)
    FROM (SELECT DISTINCT queue FROM inserted WHERE inserted AND due) AS d
    WHERE %(notify)s
)
SELECT m.name AS missing_queue, NULL::uuid AS id, NULL::text AS unique_key,
       NULL::boolean AS inserted
FROM missing AS m
UNION ALL
SELECT NULL, i.id, i.unique_key, i.inserted FROM inserted AS i
UNION ALL
SELECT NULL, NULL, NULL, NULL FROM (SELECT count(*) AS n FROM notified) AS c WHERE c.n < 0

-- name: push_job_one
-- The single-job form of push_jobs_many (the common case): no arrays to unnest. No row
-- comes back when the queue is unknown.
WITH inserted AS (
    INSERT INTO {jobs} AS j (
        id, queue, func, kwargs, meta, limits, priority, max_attempts, unique_key, scheduled_at,
        concurrency_key
    )
    SELECT %(id)s, %(queue)s, %(func)s, %(kwargs)s::jsonb, %(meta)s::jsonb, %(limits)s::jsonb,
           %(priority)s, %(max_attempts)s, %(unique_key)s,
           coalesce(%(scheduled_at)s::timestamptz, now()), %(concurrency_key)s
    WHERE NOT %(require_queues)s
       OR EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = %(queue)s)
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'running', 'retrying')
        DO UPDATE SET unique_key = EXCLUDED.unique_key
    RETURNING j.id, j.queue, (j.xmax = 0) AS inserted, j.scheduled_at <= now() AS due
)
SELECT i.id, i.inserted,
       CASE WHEN %(notify)s AND i.inserted AND i.due THEN pg_notify(
           %(channel)s, json_build_object('e', 'pushed', 'q', i.queue)::text)::text
       END AS notified
FROM inserted AS i

-- name: fetch_jobs_many
-- Claims up to %(limit)s due jobs of one queue for one worker, highest priority first,
-- then longest due, counting the attempt now, within the queue's rate limit and
-- concurrency-key limit. A row without an id means the rate limit's window is spent and
-- gives the seconds until it reopens (migrations 0002 and 0003 explain the function).
-- The columns are listed: Store.claim_jobs reads the rows by position.
SELECT id, queue, func, kwargs, meta, limits, priority, state, attempts, max_attempts,
       unique_key, concurrency_key, taken_by, created_at, scheduled_at, started_at, retry_in
FROM {fetch_jobs}(%(queue)s, %(worker_id)s, %(limit)s)

-- name: complete_jobs_batch
-- Records many outcomes at once, guarded by their claims (migration 0005 explains the
-- function); returns the ids whose claim held when %(held)s.
SELECT id FROM {complete_jobs}(
    %(worker_id)s, %(id)b::uuid[], %(attempt)b::integer[], %(state)b::text[],
    %(delay)b::float8[], %(refund)b::integer[], %(error)b::text[], %(meta)b::text[],
    %(result)b::text[], %(progress)b::text[], %(started_at)b::timestamptz[], %(notify)s,
    %(channel)s, %(held)s
) AS id

-- name: select_jobs_many
SELECT id, queue, func, kwargs, meta, limits, priority, state, attempts, max_attempts,
       unique_key, concurrency_key, taken_by, errors, result, progress, created_at,
       scheduled_at, started_at,
       completed_at
FROM {jobs}
WHERE id = ANY(%(ids)s::uuid[])

-- name: cancel_job_one
-- Cancels a live job. A running job is also announced so that its worker interrupts it.
WITH target AS (
    SELECT id, state AS previous_state, taken_by
    FROM {jobs}
    WHERE id = %(id)s AND state IN ('pending', 'retrying', 'running')
    FOR UPDATE
), cancelled AS (
    UPDATE {jobs} AS j
    SET state = 'cancelled', completed_at = now()
    FROM target
    WHERE j.id = target.id
    RETURNING j.id, target.previous_state, target.taken_by
)
SELECT c.id, c.previous_state, c.taken_by,
       CASE WHEN c.previous_state = 'running' AND %(notify)s THEN
           pg_notify(%(channel)s, json_build_object(
               'e', 'cancel', 'j', c.id, 'w', c.taken_by)::text)::text
       END AS notified
FROM cancelled AS c

-- name: retry_job_one
-- Puts a finished job back in line now, allowing one more attempt than it has used; not
-- while another live job holds its unique key.
UPDATE {jobs} AS j
SET state = 'pending', scheduled_at = now(), completed_at = NULL,
    max_attempts = greatest(j.max_attempts, j.attempts + 1)
WHERE j.id = %(id)s
  AND j.state IN ('failed', 'cancelled', 'succeeded')
  AND NOT EXISTS (
      SELECT 1 FROM {jobs} AS other
      WHERE j.unique_key IS NOT NULL AND other.unique_key = j.unique_key
        AND other.state IN ('pending', 'running', 'retrying') AND other.id <> j.id
  )
RETURNING j.id

-- name: select_cancelled_among_many
-- Which of a worker's running jobs were cancelled (the polling fallback for NOTIFY).
SELECT id FROM {jobs} WHERE id = ANY(%(ids)s::uuid[]) AND state = 'cancelled'

-- name: recover_orphaned_jobs
-- Jobs claimed by a worker that stopped heartbeating go back in line, or fail when the
-- attempt they were on was their last. Locked rows are skipped (their owner is acting).
-- Leader-only: does nothing unless %(leader)s holds a live lease.
WITH orphaned AS (
    SELECT j.id
    FROM {jobs} AS j
    WHERE j.state = 'running'
      -- The leader is alive whatever its heartbeat row says (a late heartbeat must not
      -- make it take back the jobs it is running).
      AND j.taken_by <> %(leader)s
      -- Only the current leaseholder acts, even if it was paused since it last checked.
      AND EXISTS (
          SELECT 1 FROM {leader} AS l
          WHERE l.worker_id = %(leader)s AND l.expires_at > now()
      )
      AND NOT EXISTS (
          SELECT 1 FROM {workers} AS w
          WHERE w.worker_id = j.taken_by AND w.expires_at >= now()
      )
    ORDER BY j.id
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE {jobs} AS j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'retrying' END,
    completed_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    scheduled_at = now(),
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempts,
        'worker', j.taken_by,
        'traceback', 'chancy.errors.WorkerDiedError: worker ' || coalesce(j.taken_by, '?')
                     || ' stopped heartbeating while running this job'))
FROM orphaned
WHERE j.id = orphaned.id AND j.state = 'running'
RETURNING j.id, j.state

-- name: prune_jobs_many
-- Deletes at most %(limit)s finished jobs matching a rule; never touches live jobs.
-- Leader-only: does nothing unless %(leader)s holds a live lease.
DELETE FROM {jobs}
WHERE id IN (
    SELECT id FROM {jobs}
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND ({rule})
      AND EXISTS (
          SELECT 1 FROM {leader} AS l
          WHERE l.worker_id = %(leader)s AND l.expires_at > now()
      )
    LIMIT %(limit)s
)
RETURNING id

-- name: delete_jobs_of_queue
DELETE FROM {jobs} WHERE queue = %(queue)s

-- name: select_running_of_worker
-- Jobs the database thinks a worker is running, claimed more than %(age)s seconds ago.
SELECT id, attempts
FROM {jobs}
WHERE state = 'running'
  AND taken_by = %(worker_id)s
  AND started_at < now() - make_interval(secs => %(age)s)
