-- name: metrics_set_local_timeouts
-- Keeps a flush from waiting behind a lock or a slow server for long: the deltas stay in
-- memory and the next flush tries again.
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true)

-- name: metrics_upsert_deltas
-- Adds one worker's deltas to every resolution in one statement. Bucket starts are binned
-- from the database clock (UTC, aligned to the epoch). Rows go in key order so that two
-- workers flushing the same keys cannot deadlock.
WITH delta AS (
    SELECT *
    FROM unnest(
        %(name)s::text[], %(kind)s::text[], %(queue)s::text[], %(func)s::text[],
        %(count)s::bigint[], %(total)s::float8[], %(maximum)s::float8[], %(buckets)s::text[]
    ) AS d(name, kind, queue, func, count, total, maximum, buckets)
), resolution AS (
    SELECT *
    FROM (VALUES ('1m', interval '1 minute'), ('5m', interval '5 minutes'),
                 ('1h', interval '1 hour'), ('1d', interval '1 day'),
                 ('all', NULL::interval)) AS r(name, width)
)
INSERT INTO {metrics} AS m (
    name, resolution, bucket_start, queue, func, kind, count, total, maximum, buckets
)
SELECT d.name, r.name,
       coalesce(date_bin(r.width, now(), timestamptz '1970-01-01 00:00:00+00'),
                timestamptz '1970-01-01 00:00:00+00'),
       d.queue, d.func, d.kind, d.count, d.total, d.maximum, d.buckets::bigint[]
FROM delta AS d CROSS JOIN resolution AS r
ORDER BY d.name, r.name, d.queue, d.func
ON CONFLICT (name, resolution, bucket_start, queue, func) DO UPDATE SET
    count = m.count + EXCLUDED.count,
    total = m.total + EXCLUDED.total,
    maximum = greatest(m.maximum, EXCLUDED.maximum),
    buckets = CASE
        WHEN m.buckets IS NULL OR EXCLUDED.buckets IS NULL
            THEN coalesce(m.buckets, EXCLUDED.buckets)
        ELSE ARRAY(
            SELECT coalesce(u.a, 0) + coalesce(u.b, 0)
            FROM unnest(m.buckets, EXCLUDED.buckets) WITH ORDINALITY AS u(a, b, i)
            ORDER BY u.i
        ) END,
    updated_at = now()

-- name: metrics_select_many
-- Points of one resolution, oldest first; every filter is optional. %(ago)s is seconds
-- back from the database's now().
SELECT name, kind, resolution, bucket_start, queue, func, count, total, maximum, buckets
FROM {metrics}
WHERE resolution = %(resolution)s
  AND bucket_start >= coalesce(
      %(since)s::timestamptz,
      now() - make_interval(secs => %(ago)s::float8),
      '-infinity'::timestamptz)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(func)s::text IS NULL OR func = %(func)s::text)
  AND (%(names)s::text[] IS NULL OR name = ANY(%(names)s::text[]))
ORDER BY bucket_start, name, queue, func
LIMIT %(limit)s

-- name: metrics_select_queue_gauges
-- Live gauges of every declared queue (and of any queue that has live jobs): depth
-- (pending + retrying, due or not), due jobs, age of the oldest due job, running jobs.
-- Pending jobs are counted through the fetch index and running ones through the running
-- index; finished jobs are never read.
WITH waiting AS (
    SELECT queue, count(*) AS depth,
           count(*) FILTER (WHERE scheduled_at <= now()) AS due,
           min(scheduled_at) FILTER (WHERE scheduled_at <= now()) AS oldest_due
    FROM {jobs}
    WHERE state IN ('pending', 'retrying')
    GROUP BY queue
), running AS (
    SELECT queue, count(*) AS running
    FROM {jobs}
    WHERE state = 'running'
    GROUP BY queue
), names AS (
    SELECT name AS queue FROM {queues}
    UNION SELECT queue FROM waiting
    UNION SELECT queue FROM running
)
SELECT n.queue,
       coalesce(w.depth, 0) AS depth,
       coalesce(w.due, 0) AS due,
       coalesce(extract(epoch FROM now() - w.oldest_due), 0)::float8 AS oldest_pending_age,
       coalesce(r.running, 0) AS running
FROM names AS n
LEFT JOIN waiting AS w ON w.queue = n.queue
LEFT JOIN running AS r ON r.queue = n.queue
ORDER BY n.queue

-- name: metrics_delete_expired
-- Deletes at most %(limit)s buckets older than their resolution's retention (seconds),
-- skipping rows a flush holds. Lifetime totals ('all') are never deleted.
-- Leader-only: does nothing unless %(leader)s holds a live lease.
DELETE FROM {metrics}
WHERE ctid = ANY(ARRAY(
    SELECT m.ctid
    FROM {metrics} AS m
    JOIN unnest(%(resolution)s::text[], %(keep)s::float8[]) AS r(resolution, keep)
      ON m.resolution = r.resolution
    WHERE m.resolution <> 'all'
      AND m.bucket_start < now() - make_interval(secs => r.keep)
      AND EXISTS (
          SELECT 1 FROM {leader} AS l
          WHERE l.worker_id = %(leader)s AND l.expires_at > now()
      )
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
))
RETURNING 1 AS deleted
