"""Shared by the soft-DTW tests: independent float64 loop oracles and the backend-vs-reference check.

The oracles are plain O(N*M) Python loops over one pair with true infinities; the self-tests at the
bottom pin them to closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from s3prl_laser.softdtw import soft_dtw, soft_dtw_divergence, soft_dtw_from_cost


def in_band(i: int, j: int, n: int, m: int, bandwidth: float | None) -> bool:
    """Sakoe-Chiba band: |i/n - j/m| * min(n, m) <= max(bandwidth, 1), written in integers."""
    return bandwidth is None or abs(i * m - j * n) <= math.floor(max(bandwidth, 1.0) * max(n, m))


def soft_dtw_loop(cost: np.ndarray, gamma: float, bandwidth: float | None = None) -> float:
    """R[n, m] of the soft-DTW recursion with true infinities, for one cost matrix [n, m]."""
    n, m = cost.shape
    R = np.full((n + 1, m + 1), np.inf)
    R[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if not in_band(i, j, n, m, bandwidth):
                continue
            prev = [R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]]
            low = min(prev)
            if math.isinf(low):
                continue
            total = sum(math.exp(-(p - low) / gamma) for p in prev if not math.isinf(p))
            R[i, j] = cost[i - 1, j - 1] + low - gamma * math.log(total)
    return float(R[n, m])


def sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, m] squared Euclidean distances by broadcasting (small inputs only)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


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
    """Relative error ||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def sequences(B, N, M, dtype, seed=0, d=5):
    """Random ``x: [B, N, d]``, ``y: [B, M, d]`` and a positive upstream gradient ``[B]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    upstream = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), y.to(dtype), upstream


ALL_FUNCTIONS = (soft_dtw, soft_dtw_divergence, soft_dtw_from_cost)


def check_backend_matches_reference(backend: str, device: str = "cpu", dtype=torch.float32,
                                    cases=CASES, functions=ALL_FUNCTIONS) -> None:
    """Values and gradients (x, y, or the cost matrix for ``soft_dtw_from_cost``) of ``backend`` against
    the float64 reference, under a random upstream gradient; padding must get exactly zero gradient."""
    tol = TOLERANCE[dtype]
    for k, (B, N, M, n, m, band) in enumerate(cases):
        x, y, up = sequences(B, N, M, dtype, seed=k)
        for fn in (f for f in functions if f is not soft_dtw_from_cost):
            outs = {}
            for name, dev, t in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
                a = x.to(dev, t).requires_grad_()
                b = y.to(dev, t).requires_grad_()
                val = fn(a, b, gamma=0.3, x_lengths=n, y_lengths=m, bandwidth=band, backend=name)
                grads = torch.autograd.grad(val, (a, b), up.to(dev, val.dtype))
                outs[name] = [val.cpu(), *(g.cpu() for g in grads)]
            for what, got, want in zip(("value", "grad x", "grad y"), outs[backend], outs["reference"],
                                       strict=True):
                assert rel_err(got, want) < tol, (fn.__name__, cases[k], what, rel_err(got, want))
            grad_x = outs[backend][1]
            for row, length in enumerate(n or [N] * B):
                assert torch.count_nonzero(grad_x[row, length:]) == 0, "padding frames got a gradient"
        if soft_dtw_from_cost not in functions:
            continue
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


def test_loop_oracle_closed_forms():
    cost = np.array([[0.7]])
    assert soft_dtw_loop(cost, 0.1) == 0.7
    row = np.array([[0.5, 1.0, 2.0]])  # one frame against three: a single path through every cell
    assert abs(soft_dtw_loop(row, 0.3) - 3.5) < 1e-12
    gamma = 0.5  # zero 2x2 cost: R[1,1] = R[1,2] = R[2,1] = 0, so R[2,2] = softmin(0, 0, 0)
    want = -gamma * math.log(3)
    assert abs(soft_dtw_loop(np.zeros((2, 2)), gamma) - want) < 1e-12
