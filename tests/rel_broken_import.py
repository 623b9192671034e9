"""A module that raises while it is imported (issue 4, item 15)."""

raise RuntimeError("rel_broken_import refuses to be imported")


def func() -> None:  # pragma: no cover - never reached
    return None
