-- name: web_select_jobs_page
-- One page of the dashboard's job list, newest first, below the keyset cursor. The
-- filters apply to a window of at most `scan` rows read backwards along the primary key
-- (ids are time-ordered), so a page costs the same on a table of a thousand jobs or of
-- millions, whatever the filter: the scan stops as soon as the page is full, or at the
-- end of the window (the caller then continues below the window's end).
SELECT j.id, j.queue, j.func, j.state, j.priority, j.attempts, j.max_attempts,
       j.unique_key, j.taken_by, j.created_at, j.scheduled_at, j.started_at, j.completed_at,
       left(j.kwargs::text, 200) AS kwargs_preview
FROM (
    SELECT id, queue, func, state, kwargs
    FROM {jobs}
    WHERE id < %(before)s::uuid
    ORDER BY id DESC
    LIMIT %(scan)s
) AS s
JOIN {jobs} AS j ON j.id = s.id
WHERE (%(states)s::text[] IS NULL OR s.state = ANY(%(states)s::text[]))
  AND (%(queue)s::text IS NULL OR s.queue = %(queue)s::text)
  AND (%(func)s::text IS NULL OR starts_with(s.func, %(func)s::text))
  AND (%(text)s::text IS NULL
       OR strpos(lower(s.func || ' ' || s.kwargs::text), %(text)s::text) > 0)
ORDER BY s.id DESC
LIMIT %(limit)s

-- name: web_select_jobs_window_end
-- How many jobs the window of web_select_jobs_page held, and its oldest id (an
-- index-only walk of the primary key; canonical uuid text sorts like the uuid).
SELECT count(*) AS scanned,
       min(w.id::text)::uuid AS oldest
FROM (
    SELECT id FROM {jobs} WHERE id < %(before)s::uuid ORDER BY id DESC LIMIT %(scan)s
) AS w

-- name: web_select_queue_counts
-- Per queue and state: live jobs (served by the partial fetch and running indexes), and
-- jobs finished within the last %(window)s seconds, newest first, at most %(max_rows)s of
-- them (a backward walk of the finished index; `earliest` tells how far it reached).
SELECT queue, state, count(*) AS n, NULL::timestamptz AS earliest
FROM {jobs}
WHERE state IN ('pending', 'retrying')
GROUP BY queue, state
UNION ALL
SELECT queue, state, count(*), NULL
FROM {jobs}
WHERE state = 'running'
GROUP BY queue, state
UNION ALL
SELECT r.queue, r.state, count(*), min(r.completed_at)
FROM (
    SELECT queue, state, completed_at
    FROM {jobs}
    WHERE state IN ('succeeded', 'failed', 'cancelled')
      AND completed_at > now() - make_interval(secs => %(window)s)
    ORDER BY completed_at DESC
    LIMIT %(max_rows)s
) AS r
GROUP BY r.queue, r.state

-- name: web_select_throughput
-- Jobs finished per %(bucket)s-second bucket and state over the last %(window)s seconds,
-- newest first and at most %(max_rows)s of them (a backward walk of the finished index);
-- `now` lets the caller lay out empty buckets, `earliest` how far the walk reached.
SELECT date_bin(make_interval(secs => %(bucket)s), r.completed_at,
                timestamptz '2000-01-01 00:00:00+00') AS bucket,
       r.state, count(*) AS n, min(r.completed_at) AS earliest, now() AS now
FROM (
    SELECT state, completed_at
    FROM {jobs}
    WHERE state IN ('succeeded', 'failed', 'cancelled')
      AND completed_at > now() - make_interval(secs => %(window)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
    ORDER BY completed_at DESC
    LIMIT %(max_rows)s
) AS r
GROUP BY 1, 2
ORDER BY 1

-- name: web_select_workers_all
-- Registered workers with the age of their last heartbeat (database time), whether it is
-- still valid, whether the worker leads, and how many jobs it is running.
SELECT w.worker_id, w.hostname, w.pid, w.tags, w.queues, w.started_at, w.last_seen,
       w.expires_at, extract(epoch FROM now() - w.last_seen)::float8 AS heartbeat_age,
       w.expires_at >= now() AS alive, (l.worker_id IS NOT NULL) AS is_leader,
       (SELECT count(*) FROM {jobs} AS j
        WHERE j.state = 'running' AND j.taken_by = w.worker_id) AS running
FROM {workers} AS w
LEFT JOIN {leader} AS l ON l.worker_id = w.worker_id AND l.expires_at > now()
ORDER BY w.started_at, w.worker_id

-- name: web_retry_jobs_many
-- retry_job_one for many ids at once: finished jobs go back in line now.
UPDATE {jobs} AS j
SET state = 'pending', scheduled_at = now(), completed_at = NULL,
    max_attempts = greatest(j.max_attempts, j.attempts + 1)
WHERE j.id = ANY(%(ids)s::uuid[])
  AND j.state IN ('failed', 'cancelled', 'succeeded')
  AND NOT EXISTS (
      SELECT 1 FROM {jobs} AS other
      WHERE j.unique_key IS NOT NULL AND other.unique_key = j.unique_key
        AND other.state IN ('pending', 'running', 'retrying') AND other.id <> j.id
  )
RETURNING j.id

-- name: web_cancel_jobs_many
-- cancel_job_one for many ids at once (rows locked in id order); running jobs are
-- announced so that their workers interrupt them.
WITH target AS (
    SELECT id, state AS previous_state, taken_by
    FROM {jobs}
    WHERE id = ANY(%(ids)s::uuid[]) AND state IN ('pending', 'retrying', 'running')
    ORDER BY id
    FOR UPDATE
), cancelled AS (
    UPDATE {jobs} AS j
    SET state = 'cancelled', completed_at = now()
    FROM target
    WHERE j.id = target.id
    RETURNING j.id, target.previous_state, target.taken_by
)
SELECT c.id,
       CASE WHEN c.previous_state = 'running' AND %(notify)s THEN
           pg_notify(%(channel)s, json_build_object(
               'e', 'cancel', 'j', c.id, 'w', c.taken_by)::text)::text
       END AS notified
FROM cancelled AS c

-- name: web_delete_jobs_many
-- Deletes jobs that are not running (a running job is cancelled first).
DELETE FROM {jobs}
WHERE id = ANY(%(ids)s::uuid[]) AND state <> 'running'
RETURNING id

-- name: web_select_now
SELECT now() AS now
