"""The data benchmarks run end to end on small inputs (their figures are in the README, not checked here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from s3prl_laser.training.config import resolve_config

pytestmark = pytest.mark.one_lane  # the scripts' reports; the data code is tested on every lane

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line[:2] == "| "
    ]


def test_data_throughput_reports_every_setting(capsys):
    bench = load("data_throughput")
    argv = ["--clips", "16", "--seconds", "2", "--batches", "1", "--warmup", "1", "--workers", "0", "1"]
    assert bench.main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)[1:]
    settings = [(row[0].split()[0], row[1]) for row in rows]
    assert settings == [("workers", "0"), ("workers", "1"), ("device", "1")]
    assert all(float(row[2]) > 0 for row in rows) and float(rows[0][3]) > 0
    assert "projection, 16 cores and one GPU: 15 workers" in out


def test_length_index_benchmark_times_cold_and_warm_starts(capsys):
    assert load("length_index").main(["--files", "60", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)[1:]
    assert [row[0].split(",")[0] for row in rows] == ["cold start", "cold start", "warm start (length index)"]
    assert all(float(row[1]) >= 0 for row in rows) and "for 60 files" in out


def test_peak_memory_predictions_respect_the_budget_bound(capsys):
    bench = load("peak_memory")
    gib, mib = 2**30, 2**20
    coefficients = (1.2 * gib, 35 * mib, 4 * mib)
    a, b, c = coefficients
    previous = 0.0
    for budget in (60, 100, 150, 240):
        peak, pairs, view = bench.predicted_worst_step(coefficients, budget, 1.25, 35.0, 8)
        assert 2 * pairs * view <= budget or pairs == 1  # the step fits the budget (or is one cropped pair)
        longest = min(35.0, budget / 2.5) * 1.25
        assert peak <= a + b * budget + c * budget * longest + 1  # memory grows at most with S x L
        assert peak >= bench.predicted_peak(coefficients, 1, longest)  # one pair of the longest views fits
        assert peak >= previous  # a larger budget never predicts less
        previous = peak
    pairs, view = bench.worst_step("wavlm")  # what gpu_check measures: the longest views the budget admits
    assert 2 * pairs * view <= resolve_config("wavlm").max_batch_seconds and view == pytest.approx(35 / 0.8)
    assert bench.main(["--upstream", "wavlm", "--coefficients", "1.22", "35.5", "4.30"]) == 0
    out = capsys.readouterr().out
    assert "preset wavlm_laser, max_batch_seconds=" in out and "largest budget" in out
