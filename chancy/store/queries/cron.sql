-- name: cron_check_queues_one
-- The database clock (schedules are computed from it, never the caller's) and which of
-- %(queues)s are not declared.
SELECT now() AS db_now,
       ARRAY(
           SELECT DISTINCT q.name
           FROM unnest(%(queues)s::text[]) AS q(name)
           WHERE NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)
           ORDER BY q.name
       ) AS missing

-- name: cron_upsert_schedules_many
-- Creates or replaces schedules; a replaced schedule keeps its last_run.
INSERT INTO {cron} AS c (unique_key, job, cron, timezone, catch_up, next_run)
SELECT s.unique_key, s.job::jsonb, s.cron, s.timezone, s.catch_up, s.next_run
FROM unnest(
    %(unique_key)s::text[], %(job)s::text[], %(cron)s::text[], %(timezone)s::text[],
    %(catch_up)s::integer[], %(next_run)s::timestamptz[]
) AS s(unique_key, job, cron, timezone, catch_up, next_run)
ON CONFLICT (unique_key) DO UPDATE SET
    job = EXCLUDED.job,
    cron = EXCLUDED.cron,
    timezone = EXCLUDED.timezone,
    catch_up = EXCLUDED.catch_up,
    next_run = EXCLUDED.next_run,
    updated_at = now()

-- name: cron_delete_schedules_many
DELETE FROM {cron} WHERE unique_key = ANY(%(unique_keys)s::text[]) RETURNING unique_key

-- name: cron_select_schedules_all
SELECT unique_key, job, cron, timezone, catch_up, last_run, next_run, created_at, updated_at
FROM {cron}
ORDER BY unique_key

-- name: cron_select_schedules_many
SELECT unique_key, job, cron, timezone, catch_up, last_run, next_run, created_at, updated_at
FROM {cron}
WHERE unique_key = ANY(%(unique_keys)s::text[])
ORDER BY unique_key

-- name: cron_lock_due_many
-- Locks up to %(limit)s due schedules for this transaction; rows another transaction is
-- enqueuing are skipped, and a row it already advanced no longer matches when rechecked.
-- Leader-only: returns nothing unless %(leader)s holds a live lease.
SELECT c.unique_key, c.job, c.cron, c.timezone, c.catch_up, c.next_run, now() AS db_now
FROM {cron} AS c
WHERE c.next_run <= now()
  AND EXISTS (
      SELECT 1 FROM {leader} AS l
      WHERE l.worker_id = %(leader)s AND l.expires_at > now()
  )
ORDER BY c.next_run
LIMIT %(limit)s
FOR UPDATE OF c SKIP LOCKED

-- name: cron_advance_schedules_many
-- Records an enqueue and moves each schedule to its next tick.
UPDATE {cron} AS c
SET last_run = now(), next_run = a.next_run, updated_at = now()
FROM unnest(%(unique_key)s::text[], %(next_run)s::timestamptz[]) AS a(unique_key, next_run)
WHERE c.unique_key = a.unique_key

-- name: cron_seconds_until_due_one
-- Seconds of database time until the earliest schedule is due (NULL: none scheduled).
SELECT extract(epoch FROM min(next_run) - now())::float8 AS seconds
FROM {cron}
WHERE next_run IS NOT NULL
