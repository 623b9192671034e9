-- name: upsert_worker_one
-- Registers or heartbeats a worker; it counts as alive until expires_at (database time).
INSERT INTO {workers} (worker_id, hostname, pid, tags, queues, last_seen, expires_at)
VALUES (
    %(worker_id)s, %(hostname)s, %(pid)s, %(tags)s, %(queues)s, now(),
    now() + make_interval(secs => %(timeout)s)
)
ON CONFLICT (worker_id) DO UPDATE SET
    tags = EXCLUDED.tags, queues = EXCLUDED.queues, last_seen = now(),
    expires_at = EXCLUDED.expires_at

-- name: delete_worker_one
DELETE FROM {workers} WHERE worker_id = %(worker_id)s

-- name: delete_expired_workers
DELETE FROM {workers}
WHERE expires_at < now() - make_interval(secs => %(grace)s)
  AND EXISTS (
      SELECT 1 FROM {leader} AS l WHERE l.worker_id = %(leader)s AND l.expires_at > now()
  )
RETURNING worker_id

-- name: select_workers_all
SELECT w.*, (l.worker_id IS NOT NULL) AS is_leader
FROM {workers} AS w
LEFT JOIN {leader} AS l ON l.worker_id = w.worker_id AND l.expires_at > now()
ORDER BY w.started_at

-- name: acquire_lease_one
-- Takes the lease when it is free or expired, or renews it for its owner. Returns a row
-- only when %(worker_id)s holds the lease afterwards.
INSERT INTO {leader} AS l (id, worker_id, acquired_at, expires_at)
VALUES (1, %(worker_id)s, now(), now() + make_interval(secs => %(timeout)s))
ON CONFLICT (id) DO UPDATE SET
    worker_id = EXCLUDED.worker_id,
    acquired_at = CASE WHEN l.worker_id = EXCLUDED.worker_id THEN l.acquired_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.worker_id = EXCLUDED.worker_id OR l.expires_at < now()
RETURNING l.worker_id, l.acquired_at, l.expires_at

-- name: release_lease_one
DELETE FROM {leader} WHERE id = 1 AND worker_id = %(worker_id)s

-- name: select_lease_one
SELECT worker_id, acquired_at, expires_at, expires_at > now() AS valid FROM {leader} WHERE id = 1

-- name: autovacuum_status
-- Whether autovacuum looks after the jobs table: the server's setting and the table's own.
SELECT current_setting('autovacuum') = 'on'
       AND coalesce((
           SELECT o.option_value::boolean
           FROM pg_class AS c, pg_options_to_table(c.reloptions) AS o
           WHERE c.oid = to_regclass(quote_ident(%(table)s))
             AND o.option_name = 'autovacuum_enabled'
       ), true) AS enabled
