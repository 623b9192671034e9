"""Helpers shared by the reliability tests: worker processes running ``tests.rel_worker``,
journal accounting and the CHAOS result lines that ``scripts/chaos`` tabulates."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from tests.proc import Workers, journal

#: ``pytest -m long`` (scripts/chaos) runs the long modes; CI runs the short ones.
LONG = os.environ.get("CHANCY_CHAOS_LONG") == "1"


class RelWorkers(Workers):
    """Like :class:`tests.proc.Workers`, running ``tests.rel_worker`` with its options."""

    module = "tests.rel_worker"


def run_counts(path: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(starts, ends) per tag from a journal of ``start|end <tag> <attempt>`` lines."""
    starts: collections.Counter[str] = collections.Counter()
    ends: collections.Counter[str] = collections.Counter()
    for line in journal(path):
        kind, tag, *_ = line.split()
        if kind == "start":
            starts[tag] += 1
        elif kind == "end":
            ends[tag] += 1
    return starts, ends


def report(name: str, **values: Any) -> None:
    """Print one ``CHAOS <name> key=value ...`` line for scripts/chaos (run with -s)."""
    fields = " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"\nCHAOS {name} {fields}", flush=True)
