"""Triton backend: kernels compile for sm_90, match the reference under the interpreter, and on a GPU.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the interpreted cases run in a child
``pytest`` on this same file (``test_triton_interpreter_suite``); inside that child the launcher is
skipped and the ``interpreted`` cases run. Elsewhere those cases (marker ``triton_interpreter``) are
deselected by ``conftest.py``, not skipped. Sizes stay small: the interpreter is slow. To make
diagonals span several tiles at those sizes, one case launches the kernels with a small ``max_block``,
under a bounds audit (``triton_bounds_audit.py``) that the interpreter itself does not do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_softdtw_support import TOLERANCE, check_backend_matches_reference, rel_err, sequences

from s3prl_laser.softdtw import soft_dtw, soft_dtw_divergence, soft_dtw_from_cost

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
# the interpreter runs ~30 tl ops per anti-diagonal at numpy speed: odd shapes, kept small
# (B, N, M, x_lengths, y_lengths, bandwidth)
TINY = [(1, 1, 1, None, None, None), (1, 1, 7, None, None, None), (2, 7, 1, [7, 3], None, None)]
ODD = [(1, 63, 17, None, None, None)]
MIXED = [(3, 9, 12, [9, 5, 1], [12, 12, 4], 1.0)]
# tiles of 4 cells over diagonals of up to 13: the three cost shapes of a divergence packed into one launch,
# mixed lengths, one banded pair, and the last pair at the packed table's full size (its end cell is the
# table's last element). [(cost shape, n, m, bandwidth) per pair]
SEVERAL_TILES = [((13, 15), 13, 15, None), ((13, 15), 9, 14, 1.0), ((15, 15), 6, 4, None),
                 ((15, 15), 15, 15, None)]
SMALL_TILE = 4


@pytest.mark.slow
@pytest.mark.one_lane  # numerics, run once; every lane compiles the kernels for sm_90 with its Triton (below)
@pytest.mark.skipif(INTERPRETED, reason="launcher: runs only in the parent pytest")
def test_triton_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interpreted",
           __file__]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="compiles real GPU code; the interpreter replaces triton.jit")
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_kernels_compile_for_sm90_without_a_gpu(dtype):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from s3prl_laser.softdtw import triton_backend
    from s3prl_laser.softdtw._common import BIG

    common = {"n_ptr": "*i32", "m_ptr": "*i32", "w_ptr": "*i32", "N": "i32", "M": "i32", "gamma": "fp32",
              "BIG": "constexpr", "BLOCK": "constexpr"}
    kernels = {
        triton_backend._softdtw_forward_kernel: {"C": f"*{dtype}", "R": f"*{dtype}", "V": f"*{dtype}"},
        triton_backend._softdtw_backward_kernel: {"C": f"*{dtype}", "R": f"*{dtype}", "G": f"*{dtype}",
                                                  "grad_ptr": f"*{dtype}"},
    }
    config = triton_backend.launch_config(1750, 2200)
    for kernel, pointers in kernels.items():
        source = ASTSource(kernel, {**pointers, **common}, constexprs={"BIG": BIG, "BLOCK": config["BLOCK"]})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config["num_warps"]})
        assert "bar.sync" in compiled.asm["ptx"]  # the barrier between anti-diagonals survived


@pytest.mark.triton_interpreter
def test_interpreted_triton_matches_reference_float32():
    check_backend_matches_reference("triton", "cpu", torch.float32, TINY + MIXED)
    check_backend_matches_reference("triton", "cpu", torch.float32, ODD, (soft_dtw, soft_dtw_from_cost))


@pytest.mark.triton_interpreter
def test_interpreted_triton_passes_its_self_check_and_a_broken_one_does_not(monkeypatch, caplog):
    from s3prl_laser.softdtw import reference, selfcheck, triton_backend

    monkeypatch.setattr(selfcheck, "_verdicts", {})
    cpu = torch.device("cpu")
    assert selfcheck.checked(triton_backend, cpu, torch.float32) is triton_backend
    assert selfcheck.checked(triton_backend, cpu, torch.float32, banded=True) is triton_backend
    assert not caplog.records
    real_backward = triton_backend.backward

    def halved(*args):  # a plausible bug: the gradient of the second pair halved
        grads = real_backward(*args)
        grads[0][1] *= 0.5
        return grads

    monkeypatch.setattr(triton_backend, "backward", halved)
    assert selfcheck.checked(triton_backend, cpu, torch.float64) is reference
    assert "disagrees with the reference on gradients" in caplog.text


@pytest.mark.triton_interpreter
def test_interpreted_triton_matches_reference_float64():
    check_backend_matches_reference("triton", "cpu", torch.float64, MIXED,
                                    (soft_dtw_divergence, soft_dtw_from_cost))


@pytest.mark.triton_interpreter
def test_interpreted_triton_bfloat16_and_extreme_gamma():
    x, y, _ = sequences(2, 12, 9, torch.bfloat16)
    x.requires_grad_()
    for gamma in (0.01, 10.0):
        val = soft_dtw_divergence(x, y, gamma=gamma, y_lengths=[9, 4], backend="triton")
        (grad,) = torch.autograd.grad(val.sum(), x)
        want = soft_dtw_divergence(x.detach().double(), y.double(), gamma=gamma, y_lengths=[9, 4],
                                   backend="reference")
        assert torch.isfinite(val).all() and torch.isfinite(grad.float()).all()
        assert rel_err(val, want) < 1e-4


def several_tile_pairs(dtype: torch.dtype):
    """Cost tensors (pairs grouped by shape, as ``SoftDTWFunction`` passes them) and per-pair n, m, W."""
    from s3prl_laser.softdtw._common import band_widths

    g = torch.Generator().manual_seed(0)
    shapes = list(dict.fromkeys(shape for shape, *_ in SEVERAL_TILES))
    costs = [3 * torch.rand(sum(s == shape for s, *_ in SEVERAL_TILES), *shape, generator=g,
                            dtype=torch.float64).to(dtype) for shape in shapes]
    n = [case[1] for case in SEVERAL_TILES]
    m = [case[2] for case in SEVERAL_TILES]
    W = [band_widths([a], [b], band)[0] for _, a, b, band in SEVERAL_TILES]
    return costs, n, m, W


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interpreted_kernels_over_several_tiles_match_reference_and_stay_in_their_pair(dtype):
    from triton_bounds_audit import bounds_audit

    from s3prl_laser.softdtw import reference, triton_backend

    costs, n, m, W = several_tile_pairs(dtype)
    assert triton_backend.launch_config(15, 15, SMALL_TILE)["BLOCK"] * 2 < max(map(min, n, m))
    upstream = torch.rand(len(n), generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
    with bounds_audit() as report:
        values, saved = triton_backend.forward(costs, n, m, W, 0.3, max_block=SMALL_TILE)
        grads = triton_backend.backward(costs, saved, n, m, W, 0.3, upstream, max_block=SMALL_TILE)
    assert report.lanes > 0 and report.violations == [], report
    want_costs = [c.double() for c in costs]
    want_values, want_saved = reference.forward(want_costs, n, m, W, 0.3)
    want_grads = reference.backward(want_costs, want_saved, n, m, W, 0.3, upstream.double())
    tol = TOLERANCE[dtype]
    assert rel_err(values, want_values) < tol
    for got, want in zip(grads, want_grads, strict=True):
        assert rel_err(got, want) < tol


@pytest.mark.triton_interpreter
def test_interpreted_audit_flags_a_read_past_the_row():
    from triton_bounds_audit import bounds_audit, reads_past_its_row

    x = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    y = torch.zeros(3)
    with bounds_audit() as report:
        reads_past_its_row[(3,)](x, y, 5, BLOCK=16)
    assert torch.equal(y, x[:, -1])  # the interpreter itself does not notice the overrun
    assert report.violations and report.violations[0][0] == "load", report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_matches_reference():
    check_backend_matches_reference("triton", "cuda", torch.float32)
    check_backend_matches_reference("triton", "cuda", torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_long_sequences_beyond_1024_frames():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2, 1750, 64, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(2, 2200, 64, generator=g), dim=-1)
    grads = {}
    for backend, device in (("auto", "cuda"), ("cpu", "cpu")):
        a = x.to(device).requires_grad_()
        val = soft_dtw_divergence(a, y.to(device), gamma=0.1, y_lengths=[2200, 1300], backend=backend)
        val.sum().backward()
        grads[backend] = (val.cpu(), a.grad.cpu())
    assert torch.isfinite(grads["auto"][0]).all() and torch.isfinite(grads["auto"][1]).all()
    assert rel_err(grads["auto"][0], grads["cpu"][0]) < 1e-5
    assert rel_err(grads["auto"][1], grads["cpu"][1]) < 3e-2
