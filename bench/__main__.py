"""``python -m bench``: run the scenarios against raw SQL, Chancy and the peers; print a
table of absolute figures and ratios to raw (medians of ``--runs``) and write JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import db, peers, stats
from bench.chancy_adapter import ChancySystem
from bench.raw_adapter import RawSystem
from bench.scenarios import FULL, QUICK, SCENARIOS, SMOKE, Env, Scenario, Sizes
from bench.system import System

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
SCRATCH_DATABASE = "chancy_bench"
RUN_TIMEOUT = 3600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds per run)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest sizes that still report every figure (the test suite's check)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="SCENARIO",
        help=f"run only these: {', '.join(names)}",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument("--dsn", help=f"server DSN (default ${db.DSN_ENV} or {db.DEFAULT_DSN!r})")
    parser.add_argument(
        "--database",
        default=SCRATCH_DATABASE,
        help="scratch database to create and drop (default %(default)s)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip pgqueuer/procrastinate")
    parser.add_argument("--history-size", type=int, help="finished jobs for 'history'")
    parser.add_argument("--memory-size", type=int, help="future and processed jobs for 'memory'")
    parser.add_argument("--drain-size", type=int, help="backlog size for the drain scenarios")
    parser.add_argument("--sustained-seconds", type=float, help="length of 'sustained'")
    parser.add_argument("--sustained-rate", type=float, help="offered jobs/s in 'sustained'")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    overrides = {
        "history_n": args.history_size,
        "memory_n": args.memory_size,
        "drain_n": args.drain_size,
        "sustained_seconds": args.sustained_seconds,
        "sustained_rate": args.sustained_rate,
    }
    return dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settle(scratch: db.ScratchDatabase) -> None:
    """Flush dirty buffers left by the previous run (big pushes, dropped schemas) so that
    its background writes do not land in the next measurement. Needs superuser or
    pg_checkpoint; skipped without."""
    try:
        with psycopg.connect(scratch.dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass


async def measure_system(
    scenario: Scenario,
    system: System,
    scratch: db.ScratchDatabase,
    sizes: Sizes,
    log_dir: Path,
) -> dict[str, Any]:
    """One run of one scenario for raw or Chancy, in a schema of its own."""
    if sizes != SMOKE:  # a checkpoint under load can take longer than a smoke run
        settle(scratch)
    with scratch.schema(f"{scenario.name}_{system.name}") as dsn:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            await system.open(dsn)
            env = Env(dsn, conn, sizes, log_dir)
            metrics = await asyncio.wait_for(scenario.run(env, system), RUN_TIMEOUT)
            return {"metrics": metrics, "details": env.details}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            try:
                await system.close()
            finally:
                await conn.close()


async def measure_peer(
    scenario: Scenario,
    installed: peers.Installed,
    scratch: db.ScratchDatabase,
    sizes: Sizes,
    log_dir: Path,
) -> dict[str, Any]:
    """One run of a peer's script, in a database of its own named after the scratch one."""
    op = scenario.peer_op
    assert op is not None
    n, batch = {
        "push_1txn": (sizes.push_n, 1),
        "bulk_push": (sizes.bulk_n, sizes.bulk_batch),
        "drain": (sizes.drain_n, 100),
    }[op]
    settle(scratch)
    try:
        database = f"{scratch.name}_{installed.peer.name}"
        result = await peers.measure(installed, scratch.server_dsn, database, op, n, batch, log_dir)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    keys = {m.key for m in scenario.metrics}
    return {
        "metrics": {k: float(v) for k, v in result.items() if k in keys},
        "details": {k: v for k, v in result.items() if k not in keys},
    }


def summarise(scenario: Scenario, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per system and metric, and each system's ratio to raw."""
    systems: dict[str, Any] = {}
    for name, results in runs.items():
        medians: dict[str, float] = {}
        for metric in scenario.metrics:
            values = [
                r["metrics"][metric.key] for r in results if metric.key in r.get("metrics", {})
            ]
            if values:
                medians[metric.key] = stats.median(values)
        errors = [r["error"] for r in results if "error" in r]
        systems[name] = {"median": medians, "errors": errors, "runs": results}
    raw = systems.get("raw", {}).get("median", {})
    ratios: dict[str, dict[str, float]] = {}
    for name, summary in systems.items():
        if name == "raw":
            continue
        ratios[name] = {
            m.key: summary["median"][m.key] / raw[m.key]
            for m in scenario.metrics
            if m.ratio and m.key in summary["median"] and raw.get(m.key)
        }
    return {
        "description": scenario.description,
        "metrics": [dataclasses.asdict(m) for m in scenario.metrics],
        "systems": systems,
        "ratios": ratios,
    }


def fmt(value: float, unit: str) -> str:
    if unit == "bool":
        return "yes" if value else "no"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(results: dict[str, Any], columns: list[str]) -> str:
    """Rows are (scenario, metric); a cell is the median and, off raw, the ratio to raw."""
    header = ["scenario", "metric", *columns]
    rows = [header]
    for name, summary in results.items():
        for metric in summary["metrics"]:
            key, unit = metric["key"], metric["unit"]
            row = [name, f"{key} ({unit})"]
            for column in columns:
                system = summary["systems"].get(column)
                if system is None:
                    row.append("-")
                    continue
                value = system["median"].get(key)
                if value is None:
                    row.append("error" if system["errors"] else "-")
                    continue
                cell = fmt(value, unit)
                ratio = summary["ratios"].get(column, {}).get(key)
                if ratio is not None:
                    cell += f" ({ratio:.2f}x)"
                row.append(cell)
            rows.append(row)
            name = ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    selected = [s for s in SCENARIOS if not args.only or s.name in args.only]
    server_dsn = db.base_dsn(args.dsn)
    log_dir = args.json.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    installed: list[peers.Installed] = []
    if not args.no_peers and any(s.peer_op for s in selected):
        for candidate in peers.PEERS:
            log(f"installing {candidate.name} into {peers.VENVS / candidate.name} ...")
            setup = await asyncio.to_thread(peers.install, candidate)
            log(f"  {candidate.name}: {setup.version or 'FAILED: ' + str(setup.error)}")
            installed.append(setup)

    scratch = db.ScratchDatabase(server_dsn, args.database)
    scratch.create()
    factories: dict[str, Callable[[Scenario], System]] = {
        "raw": lambda s: RawSystem(),
        "chancy": lambda s: ChancySystem(s.variant),
    }
    results: dict[str, Any] = {}
    try:
        for scenario in selected:
            runs: dict[str, list[dict[str, Any]]] = {"raw": [], "chancy": []}
            for run in range(args.runs):
                # Alternate who goes first so neither always gets the warmer server.
                order = ["raw", "chancy"] if run % 2 == 0 else ["chancy", "raw"]
                for name in order:
                    log(f"{scenario.name} run {run + 1}/{args.runs}: {name} ...")
                    system = factories[name](scenario)
                    result = await measure_system(scenario, system, scratch, sizes, log_dir)
                    log(f"  {result.get('metrics') or result.get('error')}")
                    runs[name].append(result)
                if scenario.peer_op:
                    for peer in installed:
                        log(f"{scenario.name} run {run + 1}/{args.runs}: {peer.peer.name} ...")
                        result = await measure_peer(scenario, peer, scratch, sizes, log_dir)
                        log(f"  {result.get('metrics') or result.get('error')}")
                        runs.setdefault(peer.peer.name, []).append(result)
            results[scenario.name] = summarise(scenario, runs)
    finally:
        scratch.drop()

    columns = ["raw", "chancy", *[p.peer.name for p in installed]]
    table = render_table(results, columns)
    print(table)
    for peer in installed:
        status = peer.version or f"install failed: {peer.error}"
        print(f"{peer.peer.name}: {status} ({peer.seconds:.0f} s to install/check)")
    history = results.get("history", {}).get("systems", {}).get("chancy", {})
    for run in history.get("runs", [])[:1]:
        plan = run.get("details", {}).get("fetch_plan")
        if plan:
            print("\nChancy fetch plan with history:\n" + plan)

    with psycopg.connect(server_dsn) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()
    document = {
        "meta": {
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "duration_s": time.monotonic() - began,
            "argv": sys.argv[1:] if argv is None else argv,
            "runs": args.runs,
            "quick": args.quick,
            "smoke": args.smoke,
            "sizes": dataclasses.asdict(sizes),
            "python": platform.python_version(),
            "postgres": server_version[0] if server_version else None,
            "peers": {
                p.peer.name: {"version": p.version, "error": p.error, "seconds": p.seconds}
                for p in installed
            },
        },
        "scenarios": results,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str))
    log(f"wrote {args.json} in {time.monotonic() - began:.0f} s")
    failed = [
        f"{name}/{system}"
        for name, summary in results.items()
        for system in ("raw", "chancy")
        if summary["systems"][system]["errors"]
    ]
    if failed:
        log(f"errors in: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
