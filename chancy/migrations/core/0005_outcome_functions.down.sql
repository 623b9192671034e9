DROP FUNCTION {complete_jobs}(
    text, uuid[], integer[], text[], float8[], integer[], text[], text[], text[], text[],
    timestamptz[], boolean, text, boolean
);
DROP FUNCTION {update_progress}(text, uuid[], integer[], timestamptz[], text[]);
