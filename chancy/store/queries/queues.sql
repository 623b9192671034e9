-- name: declare_queue_one
-- Creates a queue; with %(upsert)s, replaces the settings of an existing one. Returns the
-- queue as stored either way.
WITH upserted AS (
    INSERT INTO {queues} AS q (
        name, state, concurrency, tags, executor, executor_options, polling_interval,
        rate_limit, rate_limit_window, resume_at, eager_polling, concurrency_key_limit
    )
    VALUES (
        %(name)s, %(state)s, %(concurrency)s, %(tags)s, %(executor)s, %(executor_options)s,
        %(polling_interval)s, %(rate_limit)s, %(rate_limit_window)s, %(resume_at)s,
        %(eager_polling)s, %(concurrency_key_limit)s
    )
    ON CONFLICT (name) DO UPDATE SET
        state = EXCLUDED.state, concurrency = EXCLUDED.concurrency, tags = EXCLUDED.tags,
        executor = EXCLUDED.executor, executor_options = EXCLUDED.executor_options,
        polling_interval = EXCLUDED.polling_interval, rate_limit = EXCLUDED.rate_limit,
        rate_limit_window = EXCLUDED.rate_limit_window, resume_at = EXCLUDED.resume_at,
        eager_polling = EXCLUDED.eager_polling,
        concurrency_key_limit = EXCLUDED.concurrency_key_limit, updated_at = now()
    WHERE %(upsert)s
    RETURNING q.*, CASE WHEN %(notify)s THEN pg_notify(
        %(channel)s, json_build_object('e', 'queue', 'q', q.name)::text)::text END AS notified
)
SELECT name, state, concurrency, tags, executor, executor_options, polling_interval, rate_limit, rate_limit_window, resume_at, eager_polling, concurrency_key_limit, created_at, updated_at FROM upserted
UNION ALL
SELECT name, state, concurrency, tags, executor, executor_options, polling_interval, rate_limit, rate_limit_window, resume_at, eager_polling, concurrency_key_limit, created_at, updated_at FROM {queues} WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM upserted)

-- name: select_queue_one
SELECT * FROM {queues} WHERE name = %(name)s

-- name: select_queues_all
SELECT * FROM {queues} ORDER BY name

-- name: delete_queue_one
WITH deleted AS (
    DELETE FROM {queues} WHERE name = %(name)s RETURNING name
)
SELECT d.name,
       CASE WHEN %(notify)s THEN pg_notify(
           %(channel)s, json_build_object('e', 'queue', 'q', d.name)::text)::text END
FROM deleted AS d

-- name: set_queue_state_one
WITH changed AS (
    UPDATE {queues}
    SET state = %(state)s, resume_at = %(resume_at)s, updated_at = now()
    WHERE name = %(name)s
    RETURNING *
)
SELECT c.*,
       CASE WHEN %(notify)s THEN pg_notify(
           %(channel)s, json_build_object('e', 'queue', 'q', c.name)::text)::text END
           AS notified
FROM changed AS c

-- name: resume_due_queues
-- Paused queues whose resume_at has passed (by the database clock) become active.
UPDATE {queues}
SET state = 'active', resume_at = NULL, updated_at = now()
WHERE state = 'paused' AND resume_at IS NOT NULL AND resume_at <= now()
RETURNING name
