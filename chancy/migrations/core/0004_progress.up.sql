-- Progress reported by a running job: a JSON object with "percent" (0-100) and "message".
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS progress jsonb;
