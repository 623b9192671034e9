-- Limits enforced by the fetch: per-queue rate limits and keyed concurrency.

-- At most Queue.concurrency_key_limit jobs of one queue run at once per concurrency key.
ALTER TABLE {jobs} ADD COLUMN concurrency_key text
    CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 1024);
ALTER TABLE {queues} ADD COLUMN concurrency_key_limit integer NOT NULL DEFAULT 1
    CHECK (concurrency_key_limit > 0);

-- Both indexes hold keyed jobs only: a queue that never uses keys pays nothing for them.
-- Does this queue have keyed jobs waiting? (one probe decides which fetch runs)
CREATE INDEX {jobs_keyed_waiting_idx} ON {jobs} (queue)
    WHERE concurrency_key IS NOT NULL AND state IN ('pending', 'retrying');
-- How many jobs of a key are running now?
CREATE INDEX {jobs_keyed_running_idx} ON {jobs} (queue, concurrency_key)
    WHERE concurrency_key IS NOT NULL AND state = 'running';

-- One row per rate-limited queue: how many jobs its fetches claimed in the current fixed
-- window. Fetches of the queue lock the row, so the count is exact across workers.
CREATE TABLE {queue_rates} (
    queue text PRIMARY KEY REFERENCES {queues} (name) ON DELETE CASCADE,
    window_start timestamptz NOT NULL,
    started integer NOT NULL DEFAULT 0 CHECK (started >= 0)
);

DROP FUNCTION {fetch_jobs}(text, text, integer);

-- Claims up to p_limit due jobs of p_queue for p_worker_id (planner settings as in 0002).
--
-- Rate limit: windows are fixed, aligned on multiples of rate_limit_window seconds since
-- the Unix epoch (database clock); a job counts when it is claimed. The claim is cut to
-- what is left of the window's budget; once nothing is left, an extra row with a NULL id
-- says in retry_in how many seconds remain until the next window opens.
--
-- Concurrency keys: when the queue has keyed jobs waiting, the fetch walks the fetch index
-- in order and takes a keyed job only while its key has a free place. A key that looks
-- free is taken under a transaction-scoped advisory lock (without waiting: a key another
-- fetch holds is skipped this time) and its running jobs are counted again once the lock
-- is held, so two workers can never together exceed the limit. Jobs of one key start in
-- fetch order. Queues without keyed jobs run the single statement of 0002.
CREATE FUNCTION {fetch_jobs}(p_queue text, p_worker_id text, p_limit integer)
RETURNS TABLE (
    id uuid, queue text, func text, kwargs jsonb, meta jsonb, limits jsonb,
    priority smallint, state text, attempts integer, max_attempts integer,
    unique_key text, concurrency_key text, taken_by text, created_at timestamptz,
    scheduled_at timestamptz, started_at timestamptz, retry_in double precision
)
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_sort = off
SET enable_seqscan = off
AS $body$
#variable_conflict use_column
DECLARE
    v_queue_state text;
    v_rate_limit integer;
    v_window integer;
    v_key_limit integer;
    v_window_start timestamptz;
    v_started integer;
    v_current timestamptz;
    v_budget integer := p_limit;
    v_claimed integer;
    v_ids uuid[] := '{{}}';
    v_keys text[] := '{{}}';
    v_room integer[] := '{{}}';
    v_full text[] := '{{}}';
    v_full_next integer := 1;
    v_slot integer;
    v_running integer;
    v_candidate record;
    -- The claim time: for a rate-limited queue, the clock read under the rate row's lock,
    -- so that a job's started_at falls in the window that counted it.
    v_now timestamptz := now();
BEGIN
    SELECT q.state, q.rate_limit, q.rate_limit_window, q.concurrency_key_limit
    INTO v_queue_state, v_rate_limit, v_window, v_key_limit
    FROM {queues} AS q WHERE q.name = p_queue;
    -- A worker's copy of the queue may lag a pause: the database decides. A job pushed
    -- after a pause committed is never claimed by a fetch that was already on its way.
    IF v_queue_state IS DISTINCT FROM 'active' THEN
        RETURN;
    END IF;

    IF v_rate_limit IS NOT NULL AND v_window IS NOT NULL THEN
        INSERT INTO {queue_rates} (queue, window_start, started)
        VALUES (p_queue, '-infinity', 0)
        ON CONFLICT (queue) DO NOTHING;
        SELECT r.window_start, r.started INTO v_window_start, v_started
        FROM {queue_rates} AS r WHERE r.queue = p_queue
        FOR UPDATE;
        -- Read the clock once the lock is held: windows then only move forward.
        v_now := clock_timestamp();
        v_current := to_timestamp(floor(extract(epoch FROM v_now) / v_window) * v_window);
        -- A count from an earlier window is dropped. (One stamped later than the clock,
        -- after a clock step back or a change of window length, is kept: conservative.)
        IF v_window_start < v_current THEN
            v_window_start := v_current;
            v_started := 0;
        END IF;
        v_budget := least(p_limit, v_rate_limit - v_started);
    END IF;

    v_claimed := 0;
    IF v_budget > 0 THEN
        IF EXISTS (
            SELECT 1 FROM {jobs} AS k
            WHERE k.queue = p_queue AND k.concurrency_key IS NOT NULL
              AND k.state IN ('pending', 'retrying')
        ) THEN
            FOR v_candidate IN
                SELECT c.id, c.concurrency_key
                FROM {jobs} AS c
                WHERE c.queue = p_queue
                  AND c.state IN ('pending', 'retrying')
                  AND c.scheduled_at <= v_now
                ORDER BY c.priority DESC, c.scheduled_at, c.id
            LOOP
                IF v_candidate.concurrency_key IS NULL THEN
                    v_ids := v_ids || v_candidate.id;
                ELSE
                    v_slot := array_position(v_keys, v_candidate.concurrency_key);
                    IF v_slot IS NULL AND NOT v_candidate.concurrency_key = ANY(v_full) THEN
                        -- Full keys are recognised without a lock, so that a fetch locks
                        -- about as many keys as it claims jobs, however many it walks past.
                        SELECT count(*) INTO v_running
                        FROM {jobs} AS r
                        WHERE r.queue = p_queue
                          AND r.concurrency_key = v_candidate.concurrency_key
                          AND r.state = 'running';
                        IF v_running < v_key_limit AND pg_try_advisory_xact_lock(
                            hashtextextended(p_queue || chr(10) || v_candidate.concurrency_key,
                                             7364819))
                        THEN
                            -- Counted again in a new statement: its snapshot sees every
                            -- claim committed before the lock was granted.
                            SELECT count(*) INTO v_running
                            FROM {jobs} AS r
                            WHERE r.queue = p_queue
                              AND r.concurrency_key = v_candidate.concurrency_key
                              AND r.state = 'running';
                            v_keys := v_keys || v_candidate.concurrency_key;
                            v_room := v_room || greatest(v_key_limit - v_running, 0);
                            v_slot := cardinality(v_keys);
                        ELSE
                            -- Full, or being examined by another fetch: skipped. A few of
                            -- these are remembered (most backlogs of one key are adjacent).
                            v_full[v_full_next] := v_candidate.concurrency_key;
                            v_full_next := v_full_next % 64 + 1;
                        END IF;
                    END IF;
                    IF v_slot IS NOT NULL AND v_room[v_slot] > 0 THEN
                        v_room[v_slot] := v_room[v_slot] - 1;
                        v_ids := v_ids || v_candidate.id;
                    END IF;
                END IF;
                EXIT WHEN cardinality(v_ids) >= v_budget;
            END LOOP;
            -- Claimed after every count above: a job's started_at is then later than the
            -- completed_at of the job whose place it takes (kept inside the rate window).
            v_now := clock_timestamp();
            IF v_rate_limit IS NOT NULL AND v_window IS NOT NULL THEN
                v_now := least(v_now, v_current + make_interval(secs => v_window)
                                      - interval '1 microsecond');
            END IF;
            RETURN QUERY
            UPDATE {jobs} AS j
            SET state = 'running', attempts = j.attempts + 1, taken_by = p_worker_id,
                started_at = v_now
            WHERE j.id = ANY(ARRAY(
                SELECT c.id
                FROM {jobs} AS c
                WHERE c.id = ANY(v_ids)
                  -- Written so that the fetch index cannot serve it: the chosen jobs
                  -- are looked up by primary key.
                  AND (c.state IN ('pending', 'retrying')) IS TRUE
                  AND c.scheduled_at <= v_now
                FOR UPDATE SKIP LOCKED
            ))
            RETURNING j.id, j.queue, j.func, j.kwargs, nullif(j.meta, '{{}}'::jsonb),
                      nullif(j.limits, '[]'::jsonb), j.priority, j.state,
                      j.attempts, j.max_attempts, j.unique_key, j.concurrency_key, j.taken_by,
                      j.created_at, j.scheduled_at, j.started_at, NULL::float8;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;
        ELSE
            RETURN QUERY
            UPDATE {jobs} AS j
            SET state = 'running', attempts = j.attempts + 1, taken_by = p_worker_id,
                started_at = v_now
            WHERE j.id = ANY(ARRAY(
                SELECT c.id
                FROM {jobs} AS c
                WHERE c.queue = p_queue
                  AND c.state IN ('pending', 'retrying')
                  AND c.scheduled_at <= v_now
                  -- A keyed job pushed since the probe above waits for the keyed fetch.
                  AND c.concurrency_key IS NULL
                ORDER BY c.priority DESC, c.scheduled_at, c.id
                LIMIT v_budget
                FOR UPDATE SKIP LOCKED
            ))
            -- Empty meta and limits come back as NULL: nothing to decode for most jobs.
            RETURNING j.id, j.queue, j.func, j.kwargs, nullif(j.meta, '{{}}'::jsonb),
                      nullif(j.limits, '[]'::jsonb), j.priority, j.state,
                      j.attempts, j.max_attempts, j.unique_key, j.concurrency_key, j.taken_by,
                      j.created_at, j.scheduled_at, j.started_at, NULL::float8;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;
        END IF;
    END IF;

    IF v_rate_limit IS NOT NULL AND v_window IS NOT NULL THEN
        IF v_claimed > 0 THEN
            UPDATE {queue_rates} AS r
            SET window_start = v_window_start, started = v_started + v_claimed
            WHERE r.queue = p_queue;
        END IF;
        IF v_started + v_claimed >= v_rate_limit THEN
            -- Tell the caller the window is spent (on an extra row without a job).
            RETURN QUERY SELECT NULL::uuid, NULL::text, NULL::text, NULL::jsonb,
                NULL::jsonb, NULL::jsonb, NULL::smallint, NULL::text, NULL::integer,
                NULL::integer, NULL::text, NULL::text, NULL::text, NULL::timestamptz,
                NULL::timestamptz, NULL::timestamptz,
                greatest(extract(epoch FROM v_current
                    + make_interval(secs => v_window) - clock_timestamp())::float8, 0.001);
        END IF;
    END IF;
END
$body$;
