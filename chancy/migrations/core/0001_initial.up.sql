-- Core schema: queues, jobs, workers and the leadership lease.
CREATE TABLE {queues} (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,99}}$'),
    state text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused')),
    concurrency integer CHECK (concurrency IS NULL OR concurrency > 0),
    tags text[] NOT NULL DEFAULT ARRAY['.*'],
    executor text NOT NULL,
    executor_options jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    polling_interval double precision NOT NULL DEFAULT 5 CHECK (polling_interval > 0),
    rate_limit integer CHECK (rate_limit IS NULL OR rate_limit > 0),
    rate_limit_window integer CHECK (rate_limit_window IS NULL OR rate_limit_window > 0),
    resume_at timestamptz,
    eager_polling boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {jobs} (
    id uuid PRIMARY KEY,
    queue text NOT NULL,
    func text NOT NULL CHECK (length(func) BETWEEN 1 AND 1000),
    kwargs jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    meta jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    limits jsonb NOT NULL DEFAULT '[]'::jsonb,
    priority smallint NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    unique_key text CHECK (unique_key IS NULL OR length(unique_key) BETWEEN 1 AND 1024),
    taken_by text,
    errors jsonb NOT NULL DEFAULT '[]'::jsonb,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    scheduled_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    completed_at timestamptz,
    CHECK (state <> 'running' OR taken_by IS NOT NULL),
    CHECK ((completed_at IS NOT NULL) = (state IN ('succeeded', 'failed', 'cancelled')))
) WITH (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 1
);

-- Serves the fetch predicate and order exactly; finished rows never enter it. Within a
-- priority, jobs due now come before jobs scheduled later, so a fetch stops before it
-- reaches the future ones.
CREATE INDEX {jobs_fetch_idx} ON {jobs} (queue, priority DESC, scheduled_at, id)
    WHERE state IN ('pending', 'retrying');

-- Recovery looks up running jobs by the worker that claimed them.
CREATE INDEX {jobs_running_idx} ON {jobs} (taken_by) WHERE state = 'running';

-- Retention: finished jobs by age.
CREATE INDEX {jobs_finished_idx} ON {jobs} (completed_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');

-- A unique key is exclusive while the job is live.
CREATE UNIQUE INDEX {jobs_unique_key_idx} ON {jobs} (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('pending', 'running', 'retrying');

CREATE TABLE {workers} (
    worker_id text PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    tags text[] NOT NULL DEFAULT '{{}}',
    queues text[] NOT NULL DEFAULT '{{}}',
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE TABLE {leader} (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    worker_id text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
