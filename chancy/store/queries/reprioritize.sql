-- name: reprioritize_jobs_many
-- Changes the priority of up to %(limit)s pending or retrying jobs matching a rule, once
-- per job: a changed job carries meta.reprioritized_at and is never picked again, so
-- repeated passes cannot raise it further. Jobs being claimed right now are skipped.
-- Leader-only: does nothing unless %(leader)s holds a live lease.
WITH picked AS (
    SELECT id
    FROM {jobs}
    WHERE state IN ('pending', 'retrying')
      AND NOT (meta ? 'reprioritized_at')
      AND ({rule})
      AND EXISTS (
          SELECT 1 FROM {leader} AS l
          WHERE l.worker_id = %(leader)s AND l.expires_at > now()
      )
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} AS j
SET priority = least(greatest(j.priority::integer + %(increase)s::integer, -32768), 32767),
    meta = j.meta || jsonb_build_object(
        'reprioritized_at', now(), 'reprioritized_from', j.priority)
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.priority
