"""Fast backends against the float64 reference: values and every gradient over odd shapes.

The ``cpu`` backend runs here; the ``triton`` backend reuses :func:`check_backend_matches_reference`
under the Triton interpreter (``test_softdtw_triton.py``) and on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from s3prl_laser.softdtw import soft_dtw, soft_dtw_divergence, soft_dtw_from_cost

# relative error ||a - b|| / ||b|| allowed per compute dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}

# (B, N, M, x_lengths, y_lengths, bandwidth)
CASES = [
    (1, 1, 1, None, None, None),
    (1, 1, 7, None, None, None),
    (2, 7, 1, [7, 3], None, None),
    (1, 63, 17, None, None, None),
    (3, 17, 63, [17, 9, 1], [63, 30, 5], None),
    (3, 20, 24, [20, 11, 4], [24, 24, 13], 2.0),
    (2, 31, 12, None, [12, 7], 0.0),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(B, N, M, dtype, seed=0, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    upstream = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), y.to(dtype), upstream


def check_backend_matches_reference(backend: str, device: str = "cpu", dtype=torch.float32) -> None:
    """Values and gradients (x, y and cost-matrix input) of ``backend`` against the float64 reference."""
    tol = TOLERANCE[dtype]
    for k, (B, N, M, n, m, band) in enumerate(CASES):
        x, y, up = _inputs(B, N, M, dtype, seed=k)
        for fn in (soft_dtw, soft_dtw_divergence):
            outs = {}
            for name, dev, t in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
                a = x.to(dev, t).requires_grad_()
                b = y.to(dev, t).requires_grad_()
                val = fn(a, b, gamma=0.3, x_lengths=n, y_lengths=m, bandwidth=band, backend=name)
                grads = torch.autograd.grad(val, (a, b), up.to(dev, val.dtype))
                outs[name] = [val.cpu(), *(g.cpu() for g in grads)]
            for what, got, want in zip(("value", "grad x", "grad y"), outs[backend], outs["reference"],
                                       strict=True):
                assert rel_err(got, want) < tol, (fn.__name__, CASES[k], what, rel_err(got, want))
            grad_x = outs[backend][1]
            for row, length in enumerate(n or [N] * B):
                assert torch.count_nonzero(grad_x[row, length:]) == 0, "padding frames got a gradient"
        cost = torch.rand(B, N, M, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 3
        outs = {}
        for name, dev, t in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
            c = cost.to(dev, t).requires_grad_()
            val = soft_dtw_from_cost(c, gamma=0.3, x_lengths=n, y_lengths=m, bandwidth=band, backend=name)
            (grad,) = torch.autograd.grad(val, c, up.to(dev, val.dtype))
            outs[name] = (val.cpu(), grad.cpu())
        assert rel_err(outs[backend][0], outs["reference"][0]) < tol
        assert rel_err(outs[backend][1], outs["reference"][1]) < tol
        for row in range(B):
            nb, mb = (n or [N] * B)[row], (m or [M] * B)[row]
            pad = outs[backend][1][row].clone()
            pad[:nb, :mb] = 0
            assert torch.count_nonzero(pad) == 0, "padding cells of the cost got a gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(dtype):
    check_backend_matches_reference("cpu", "cpu", dtype)


def test_auto_on_cpu_matches_reference():
    x, y, _ = _inputs(2, 9, 11, torch.float32)
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
    x, y, _ = _inputs(2, 50, 70, torch.float64, d=16)
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
    x, y, _ = _inputs(2, 30, 25, torch.bfloat16, d=8)
    x.requires_grad_()
    val = soft_dtw_divergence(x, y, backend="cpu")
    val.sum().backward()
    want = soft_dtw_divergence(x.detach().double(), y.double(), backend="reference")
    assert val.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert rel_err(val, want) < 1e-4


def test_cpu_rejects_cuda_style_requests():
    x, y, _ = _inputs(1, 4, 4, torch.float32)
    with pytest.raises(ValueError):
        soft_dtw(x.to(torch.device("meta")), y.to(torch.device("meta")), backend="cpu")
