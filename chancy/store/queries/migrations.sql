-- name: create_versions_table
CREATE TABLE IF NOT EXISTS {versions} (
    key text PRIMARY KEY,
    version integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)

-- name: lock_migrations_xact
-- Serialises concurrent migrate() calls for this prefix until the transaction ends.
SELECT pg_advisory_xact_lock(hashtextextended(%(lock_name)s, 0))

-- name: select_version_one
SELECT version FROM {versions} WHERE key = %(key)s

-- name: set_version_one
INSERT INTO {versions} (key, version) VALUES (%(key)s, %(version)s)
ON CONFLICT (key) DO UPDATE SET version = EXCLUDED.version, updated_at = now()

-- name: versions_table_exists
SELECT to_regclass(%(table)s) IS NOT NULL AS exists
