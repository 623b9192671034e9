"""The benchmark harness still runs: ``python -m bench --smoke --no-peers`` with the
smallest sizes exits 0 and reports a finite number for every scenario and metric (and
Chancy's fetch uses its index). Nothing about speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_reports_every_scenario(base_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--no-peers",
        "--runs",
        "1",
        "--dsn",
        base_dsn,
        "--database",
        f"chancy_bench_smoke_{os.getpid()}",
        "--json",
        str(out),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["scenarios"]
    assert set(results) == {s.name for s in SCENARIOS}
    for scenario in SCENARIOS:
        for system in ("raw", "chancy"):
            medians = results[scenario.name]["systems"][system]["median"]
            for metric in scenario.metrics:
                if metric.key == "uses_fetch_index" and system == "raw":
                    continue
                value = medians.get(metric.key)
                assert isinstance(value, int | float), (scenario.name, system, metric.key)
                assert math.isfinite(value), (scenario.name, system, metric.key)
