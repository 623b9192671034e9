-- Workflows: named graphs of steps. A step becomes a job once every step it depends on
-- has succeeded; the workflow finishes when no step can run any more.
CREATE TABLE {workflows} (
    id uuid PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'completed', 'failed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    CHECK ((completed_at IS NOT NULL) = (state IN ('completed', 'failed')))
);

-- The leader's polling fallback looks only at live workflows.
CREATE INDEX {workflows_live_idx} ON {workflows} (id) WHERE state IN ('pending', 'running');

-- Retention: finished workflows by age.
CREATE INDEX {workflows_finished_idx} ON {workflows} (completed_at)
    WHERE state IN ('completed', 'failed');

-- Listing by state, newest first (keyset pagination on id).
CREATE INDEX {workflows_state_idx} ON {workflows} (state, id);

CREATE TABLE {workflow_steps} (
    workflow_id uuid NOT NULL REFERENCES {workflows} (id) ON DELETE CASCADE,
    step_id text NOT NULL CHECK (length(step_id) BETWEEN 1 AND 255),
    group_id text CHECK (group_id IS NULL OR length(group_id) BETWEEN 1 AND 255),
    position integer NOT NULL,
    -- The job to push (func, queue, kwargs, meta, limits, priority, ...), as JSON.
    job jsonb NOT NULL,
    dependencies text[] NOT NULL DEFAULT '{{}}',
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'skipped')),
    job_id uuid,
    started_at timestamptz,
    completed_at timestamptz,
    PRIMARY KEY (workflow_id, step_id),
    -- A step has a job exactly when it was started.
    CHECK ((job_id IS NULL) = (state IN ('pending', 'skipped'))),
    CHECK ((completed_at IS NOT NULL) = (state NOT IN ('pending', 'running')))
);
