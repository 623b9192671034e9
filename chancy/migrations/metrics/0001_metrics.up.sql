-- Metrics aggregated across workers: one row per metric, resolution, time bucket and label
-- set. Workers add their in-memory deltas with ON CONFLICT DO UPDATE; bucket starts come
-- from the database clock. Resolution 'all' holds lifetime totals (one bucket, never
-- pruned) so that exported counters only ever grow.
CREATE TABLE {metrics} (
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    resolution text NOT NULL CHECK (resolution IN ('1m', '5m', '1h', '1d', 'all')),
    bucket_start timestamptz NOT NULL,
    queue text NOT NULL DEFAULT '',
    func text NOT NULL DEFAULT '',
    kind text NOT NULL CHECK (kind IN ('counter', 'histogram', 'gauge')),
    count bigint NOT NULL DEFAULT 0 CHECK (count >= 0),
    total double precision NOT NULL DEFAULT 0,
    maximum double precision,
    buckets bigint[],
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, resolution, bucket_start, queue, func),
    CHECK ((kind = 'histogram') = (buckets IS NOT NULL))
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);

-- Time-range reads of one resolution and retention both walk this index.
CREATE INDEX {metrics_bucket_idx} ON {metrics} (resolution, bucket_start);
