-- name: workflow_select_missing_queues
-- Which of the queues named by a workflow's steps were never declared.
SELECT DISTINCT q.name AS missing_queue
FROM unnest(%(queues)s::text[]) AS q(name)
WHERE NOT EXISTS (SELECT 1 FROM {queues} AS known WHERE known.name = q.name)
ORDER BY 1

-- name: workflow_insert_one
INSERT INTO {workflows} (id, name) VALUES (%(id)s, %(name)s)

-- name: workflow_insert_steps_many
-- All steps of one workflow in one statement; dependencies arrive as JSON arrays because
-- SQL arrays of arrays must be rectangular.
INSERT INTO {workflow_steps} (workflow_id, step_id, group_id, position, job, dependencies)
SELECT %(workflow_id)s, s.step_id, s.group_id, s.position, s.job::jsonb,
       ARRAY(SELECT jsonb_array_elements_text(s.dependencies::jsonb))
FROM unnest(
    %(step_id)s::text[], %(group_id)s::text[], %(position)s::integer[], %(job)s::text[],
    %(dependencies)s::text[]
) AS s(step_id, group_id, position, job, dependencies)

-- name: workflow_lock_many
-- Locks the given live workflows (in id order, so two advancers cannot deadlock). Waits
-- for a concurrent advancer instead of skipping: it may have read step states before the
-- completion that woke us committed.
SELECT id FROM {workflows}
WHERE id = ANY(%(ids)s::uuid[]) AND state IN ('pending', 'running')
ORDER BY id
FOR UPDATE

-- name: workflow_lock_stale_many
-- The polling fallback: live workflows with a started step whose job has finished (or is
-- gone), or that still say pending though a step's job has started. Busy ones are skipped;
-- whoever holds them is advancing them.
SELECT w.id FROM {workflows} AS w
WHERE w.state IN ('pending', 'running')
  AND EXISTS (
      SELECT 1
      FROM {workflow_steps} AS s
      LEFT JOIN {jobs} AS j ON j.id = s.job_id
      WHERE s.workflow_id = w.id AND s.state = 'running'
        AND (j.id IS NULL OR j.state IN ('succeeded', 'failed', 'cancelled')
             OR (w.state = 'pending' AND j.state <> 'pending'))
  )
ORDER BY w.id
LIMIT %(limit)s
FOR UPDATE OF w SKIP LOCKED

-- name: workflow_sync_steps_many
-- Started steps take the final state of their job; a step whose job vanished (deleted
-- with its queue) counts as failed.
UPDATE {workflow_steps} AS s
SET state = CASE WHEN x.job_state IS NULL THEN 'failed' ELSE x.job_state END,
    completed_at = coalesce(x.job_completed_at, now())
FROM (
    SELECT s2.workflow_id, s2.step_id, j.state AS job_state, j.completed_at AS job_completed_at
    FROM {workflow_steps} AS s2
    LEFT JOIN {jobs} AS j ON j.id = s2.job_id
    WHERE s2.workflow_id = ANY(%(ids)s::uuid[]) AND s2.state = 'running'
      AND (j.id IS NULL OR j.state IN ('succeeded', 'failed', 'cancelled'))
) AS x
WHERE s.workflow_id = x.workflow_id AND s.step_id = x.step_id
RETURNING s.workflow_id, s.step_id, s.state

-- name: workflow_skip_doomed_many
-- Pending steps that depend, directly or not, on a step that failed, was cancelled or was
-- skipped can never run: they become skipped.
WITH RECURSIVE doomed(workflow_id, step_id) AS (
    SELECT s.workflow_id, s.step_id
    FROM {workflow_steps} AS s
    WHERE s.workflow_id = ANY(%(ids)s::uuid[])
      AND s.state IN ('failed', 'cancelled', 'skipped')
    UNION
    SELECT s.workflow_id, s.step_id
    FROM {workflow_steps} AS s
    JOIN doomed AS d ON d.workflow_id = s.workflow_id AND d.step_id = ANY(s.dependencies)
    WHERE s.state = 'pending'
)
UPDATE {workflow_steps} AS s
SET state = 'skipped', completed_at = now()
FROM doomed AS d
WHERE s.workflow_id = d.workflow_id AND s.step_id = d.step_id AND s.state = 'pending'
RETURNING s.workflow_id, s.step_id

-- name: workflow_select_ready_many
-- Pending steps whose dependencies have all succeeded, in the order they were added.
SELECT s.workflow_id, s.step_id, s.job
FROM {workflow_steps} AS s
WHERE s.workflow_id = ANY(%(ids)s::uuid[]) AND s.state = 'pending'
  AND NOT EXISTS (
      SELECT 1
      FROM unnest(s.dependencies) AS d(step_id)
      LEFT JOIN {workflow_steps} AS p
          ON p.workflow_id = s.workflow_id AND p.step_id = d.step_id
      WHERE p.state IS DISTINCT FROM 'succeeded'
  )
ORDER BY s.workflow_id, s.position

-- name: workflow_start_steps_many
UPDATE {workflow_steps} AS s
SET state = 'running', job_id = u.job_id, started_at = now()
FROM unnest(%(workflow_id)s::uuid[], %(step_id)s::text[], %(job_id)s::uuid[])
    AS u(workflow_id, step_id, job_id)
WHERE s.workflow_id = u.workflow_id AND s.step_id = u.step_id AND s.state = 'pending'

-- name: workflow_update_states_many
-- A workflow is completed when every step succeeded, failed when no step can run any more
-- and one did not succeed, running once a step's job has started, else pending.
WITH summary AS (
    SELECT s.workflow_id,
           bool_and(s.state = 'succeeded') AS all_succeeded,
           bool_and(s.state IN ('succeeded', 'failed', 'cancelled', 'skipped')) AS all_done,
           bool_or(s.state NOT IN ('pending', 'running') OR j.state <> 'pending') AS started
    FROM {workflow_steps} AS s
    LEFT JOIN {jobs} AS j ON j.id = s.job_id AND s.state = 'running'
    WHERE s.workflow_id = ANY(%(ids)s::uuid[])
    GROUP BY s.workflow_id
), target AS (
    SELECT workflow_id,
           CASE WHEN all_succeeded THEN 'completed'
                WHEN all_done THEN 'failed'
                WHEN started THEN 'running'
                ELSE 'pending' END AS state
    FROM summary
)
UPDATE {workflows} AS w
SET state = t.state, updated_at = now(),
    completed_at = CASE WHEN t.state IN ('completed', 'failed') THEN now() END
FROM target AS t
WHERE w.id = t.workflow_id AND w.state <> t.state
RETURNING w.id, w.state

-- name: workflow_select_many
SELECT id, name, state, created_at, updated_at, completed_at
FROM {workflows}
WHERE id = ANY(%(ids)s::uuid[])

-- name: workflow_select_page
-- Newest first; pass the last id of a page as %(before)s for the next one.
SELECT id, name, state, created_at, updated_at, completed_at
FROM {workflows}
WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
  AND (%(before)s::uuid IS NULL OR id < %(before)s::uuid)
ORDER BY id DESC
LIMIT %(limit)s

-- name: workflow_select_steps_many
-- Steps with the live state of their job, if any.
SELECT s.workflow_id, s.step_id, s.group_id, s.job, s.dependencies, s.state, s.job_id,
       s.started_at, s.completed_at, j.state AS job_state
FROM {workflow_steps} AS s
LEFT JOIN {jobs} AS j ON j.id = s.job_id
WHERE s.workflow_id = ANY(%(ids)s::uuid[])
ORDER BY s.workflow_id, s.position

-- name: workflow_mark_running_many
-- A step's job has started: its pending workflow is running now. Rows are locked in id
-- order like every advance does, so the two cannot deadlock.
WITH target AS (
    SELECT id FROM {workflows}
    WHERE id = ANY(%(ids)s::uuid[]) AND state = 'pending'
    ORDER BY id
    FOR UPDATE
)
UPDATE {workflows} AS w
SET state = 'running', updated_at = now()
FROM target
WHERE w.id = target.id AND w.state = 'pending'
RETURNING w.id, w.state

-- name: workflow_prune_many
-- Deletes at most %(limit)s workflows (their steps go with them) that finished more than
-- %(age)s seconds ago; live workflows are never touched.
DELETE FROM {workflows}
WHERE id IN (
    SELECT id FROM {workflows}
    WHERE state IN ('completed', 'failed')
      AND completed_at < now() - make_interval(secs => %(age)s)
    ORDER BY completed_at
    LIMIT %(limit)s
)
RETURNING id
