"""Store operations of the Reprioritize plugin."""

from __future__ import annotations

from psycopg import sql

from chancy.job import Reference
from chancy.store import Op, Params, Store, _query_texts, compose


def reprioritize_jobs(
    store: Store,
    leader: str,
    rule: sql.Composable,
    params: Params,
    *,
    increase: int,
    limit: int,
) -> Op[dict[Reference, int]]:
    """As leaseholder ``leader``, add ``increase`` to the priority (clamped to the column's
    range) of at most ``limit`` pending or retrying jobs matching ``rule`` that were never
    reprioritized; returns their new priorities (nothing if the lease is not held)."""
    query = compose(_query_texts()["reprioritize_jobs_many"], store.prefix, rule=rule)
    rows = yield query, {**params, "leader": leader, "increase": increase, "limit": limit}
    return {Reference(r["id"]): r["priority"] for r in rows}
