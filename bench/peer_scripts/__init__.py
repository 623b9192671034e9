"""Scripts run by peers' own interpreters (bench/.venvs/NAME); they import only the peer."""
