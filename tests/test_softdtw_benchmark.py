"""The soft-DTW benchmark script runs end to end in its quick mode and prints its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import warm_processes

pytestmark = pytest.mark.one_lane  # the script's table; the engine is tested on every lane

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "softdtw.py"


def test_benchmark_quick_prints_a_table():
    cmd = [sys.executable, str(SCRIPT), "--quick", "--peers", "--backends", "cpu", "reference"]
    proc = warm_processes.run(cmd, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 50x")]
    assert len(rows) == 4, proc.stdout  # 50x62 and the mixed batch, for two backends
    assert all(row.count("|") == 8 for row in rows)
    assert {row.split("|")[2].strip() for row in rows} == {"ours:cpu", "ours:reference"}
