"""The one-command GPU check runs its CPU smoke path end to end: tables printed, one consistent JSON report.

The Triton kernels run there through the interpreter (``TRITON_INTERPRET=1`` in the child process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_processes
from foreign_lines import foreign_lines

pytestmark = pytest.mark.one_lane  # the script's report; the kernels are tested on every lane

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_path_reports_every_section(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("## correctness", "## the probe", "## soft-DTW", "## fine-tuning"):
        assert title in proc.stdout, proc.stdout
    assert foreign_lines(proc.stdout + proc.stderr) == []  # torch's warnings under s3prl's models: DEBUG
    report = json.loads(out.read_text())

    checks = report["correctness"]
    assert len(checks) == 4 and all(c["passed"] is True and c["backend"] == "triton" for c in checks), checks
    for c in checks:
        tol = c["tolerance"]
        assert all(err < tol["value" if key == "value" else "grad"] for key, err in c["errors"].items()), c
    assert max(c["tiles per longest diagonal"] for c in checks) > 1  # some diagonals spanned several tiles

    timings = report["softdtw"]
    ours = [r for r in timings if r["method"].startswith("ours")]
    peers = [r for r in timings if r["method"].startswith("pysdtw")]
    assert len(ours) == len(peers) == 2
    assert all(r[k] > 0 for r in ours for k in ("fwd", "bwd", "div"))
    if importlib.util.find_spec("pysdtw") is None:
        assert all("not installed" in r["note"] for r in peers), peers
        assert "pysdtw not installed" in proc.stdout
    else:
        assert all(r["div"] > 0 for r in peers), peers

    probe = report["probe"]  # python -m s3prl_laser.probe end to end, each head its whole budget
    assert "failed" not in probe, probe
    assert probe["head steps run"] == [3, 3] and probe["seconds"] > 0 and len(probe["CER %"]) == 2, probe

    runs = {r["preset"]: r for r in report["finetune"]}
    assert set(runs) == {"hubert_laser", "wavlm_laser"}
    for r in runs.values():
        assert r["pairs/s"] > 0 and r["peak MiB"] >= 0 and r["precision"] == "fp32"  # CPU: no autocast
        assert r["3600x8 h"] == pytest.approx(3600 * 8 / r["pairs/s"] / 3600)
        assert r["worst step"] == "1 x 0.5 s (smoke)" and r["worst step peak MiB"] > 0, r


def test_gpu_check_runs_only_the_sections_asked(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--only", "probe", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## the probe" in proc.stdout and "## correctness" not in proc.stdout
    assert "## fine-tuning" not in proc.stdout and "## soft-DTW" not in proc.stdout
    report = json.loads(out.read_text())
    assert report["sections"] == ["probe"] and report["correctness"] == report["finetune"] == []
    bad = [*cmd[:4], "probe,gpu"]
    bad = subprocess.run(bad, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert bad.returncode == 2 and "unknown section(s) gpu; choose from" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole check")
def test_gpu_check_without_a_gpu_says_what_to_do(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu_check.json")]
    proc = warm_processes.run(cmd, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stdout and "--smoke" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
