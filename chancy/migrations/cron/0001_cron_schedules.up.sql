-- Cron schedules: one row per scheduled job, keyed by the job's unique_key. The leader
-- enqueues rows whose next_run has passed and advances next_run in the same transaction.
CREATE TABLE {cron} (
    unique_key text PRIMARY KEY CHECK (length(unique_key) BETWEEN 1 AND 1024),
    job jsonb NOT NULL CHECK (jsonb_typeof(job) = 'object'),
    cron text NOT NULL CHECK (length(cron) BETWEEN 1 AND 1000),
    timezone text NOT NULL DEFAULT 'UTC' CHECK (length(timezone) BETWEEN 1 AND 200),
    -- 0: a run missed while no worker was up is skipped (one run, then the next tick);
    -- n > 0: up to n missed ticks are enqueued, one job each.
    catch_up integer NOT NULL DEFAULT 0 CHECK (catch_up >= 0),
    last_run timestamptz,
    -- NULL: the expression has no future tick (the schedule is dormant).
    next_run timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The leader's "what is due" lookup.
CREATE INDEX {cron_next_run_idx} ON {cron} (next_run) WHERE next_run IS NOT NULL;
