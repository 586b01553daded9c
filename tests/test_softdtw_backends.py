"""The ``cpu`` backend against the float64 reference: values and every gradient over odd shapes.

The ``triton`` backend runs the same check (``test_softdtw_triton.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_softdtw_support import check_backend_matches_reference, rel_err, sequences

from s3prl_laser.softdtw import soft_dtw, soft_dtw_divergence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(dtype):
    check_backend_matches_reference("cpu", "cpu", dtype)


def test_auto_on_cpu_matches_reference():
    x, y, _ = sequences(2, 9, 11, torch.float32)
    want = soft_dtw_divergence(x.double(), y.double(), backend="reference")
    torch.testing.assert_close(soft_dtw_divergence(x, y).double(), want, rtol=1e-4, atol=1e-4)


def test_cpu_long_float32_close_to_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(2, 1600, 32, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(2, 2000, 32, generator=g), dim=-1)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    lengths = [2000, 1500]
    v32 = soft_dtw_divergence(x32, y, gamma=0.1, y_lengths=lengths, backend="cpu")
    v64 = soft_dtw_divergence(x64, y.double(), gamma=0.1, y_lengths=lengths, backend="cpu")
    v32.sum().backward()
    v64.sum().backward()
    assert torch.isfinite(v32).all() and torch.isfinite(x32.grad).all()
    assert rel_err(v32, v64) < 1e-5
    # float32 R tables lose absolute precision as R grows along 3600 anti-diagonals: ~1 % here
    assert rel_err(x32.grad, x64.grad) < 3e-2


@pytest.mark.parametrize("gamma", [0.01, 10.0])
def test_cpu_extreme_gamma_finite_and_close(gamma):
    x, y, _ = sequences(2, 50, 70, torch.float64, d=16)
    kw = dict(gamma=gamma, y_lengths=[70, 9], bandwidth=3)
    grads = {}
    for name, t in (("cpu", torch.float32), ("cpu", torch.float64), ("reference", torch.float64)):
        a = x.to(t).requires_grad_()
        val = soft_dtw_divergence(a, y.to(t), backend=name, **kw)
        val.sum().backward()
        assert torch.isfinite(val).all() and torch.isfinite(a.grad).all()
        grads[name, t] = (val, a.grad)
    want = grads["reference", torch.float64]
    assert rel_err(grads["cpu", torch.float32][0], want[0]) < 1e-4
    assert rel_err(grads["cpu", torch.float64][0], want[0]) < 1e-10
    assert rel_err(grads["cpu", torch.float64][1], want[1]) < 1e-8


def test_cpu_bfloat16_input():
    x, y, _ = sequences(2, 30, 25, torch.bfloat16, d=8)
    x.requires_grad_()
    val = soft_dtw_divergence(x, y, backend="cpu")
    val.sum().backward()
    want = soft_dtw_divergence(x.detach().double(), y.double(), backend="reference")
    assert val.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert rel_err(val, want) < 1e-4


def test_cpu_rejects_cuda_style_requests():
    x, y, _ = sequences(1, 4, 4, torch.float32)
    with pytest.raises(ValueError):
        soft_dtw(x.to(torch.device("meta")), y.to(torch.device("meta")), backend="cpu")


_CHILD = """
import logging, torch
from s3prl_laser.softdtw import soft_dtw_divergence
from s3prl_laser.softdtw.cpu_backend import KernelBuildError
logging.basicConfig(level=logging.WARNING)
x, y = torch.randn(2, 6, 3), torch.randn(2, 8, 3)
try:
    soft_dtw_divergence(x, y, backend="cpu")
    print("cpu: ran")
except KernelBuildError as err:
    print("cpu: KernelBuildError:", err)
a = soft_dtw_divergence(x, y)
b = soft_dtw_divergence(x, y)
print("auto equals reference:", torch.allclose(a, soft_dtw_divergence(x, y, backend="reference")))
"""


def _run_child(tmp_path, **env):
    full_env = {**os.environ, "S3PRL_LASER_HOME": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=full_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_without_compiler_cpu_raises_and_auto_warns_once(tmp_path):
    proc = _run_child(tmp_path, PATH=str(tmp_path), CC="")
    assert "cpu: KernelBuildError: no C compiler found" in proc.stdout
    assert "auto equals reference: True" in proc.stdout
    assert proc.stderr.count("fast CPU kernel is unavailable") == 1  # two auto calls, one warning
    assert not list(tmp_path.glob("*.so"))


def test_kernel_compiles_into_the_cache_dir(tmp_path):
    proc = _run_child(tmp_path)
    assert "cpu: ran" in proc.stdout and "auto equals reference: True" in proc.stdout
    built = list(tmp_path.glob("sdtw_cpu-*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temp dirs left


@pytest.mark.parametrize("batch", [3, 7])  # 9 and 21 lanes: one and two groups of the 16-lane build
def test_cpu_lane_groups_of_both_widths(batch):
    x, y, up = sequences(batch, 13, 10, torch.float32, seed=batch)
    n = [13 - k % 5 for k in range(batch)]
    m = [10 - k % 7 for k in range(batch)]
    outs = {}
    for name, t in (("cpu", torch.float32), ("reference", torch.float64)):
        a = x.to(t).requires_grad_()
        val = soft_dtw_divergence(a, y.to(t), gamma=0.2, x_lengths=n, y_lengths=m, bandwidth=2, backend=name)
        outs[name] = (val, *torch.autograd.grad(val, a, up.to(t)))
    for got, want in zip(outs["cpu"], outs["reference"], strict=True):
        assert rel_err(got, want) < 2e-4
