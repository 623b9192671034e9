DROP FUNCTION IF EXISTS {fetch_jobs}(text, text, integer);
