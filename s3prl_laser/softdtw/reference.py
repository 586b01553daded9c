"""Pure-PyTorch soft-DTW: the readable oracle every other backend is tested against.

Runs on any device and in float64. The forward pass fills the DP table ``R`` anti-diagonal by
anti-diagonal (vectorised over the batch and the diagonal); the backward pass runs the ``E``
recursion of Cuturi & Blondel (2017) in the opposite order. Both loops are O(N + M) Python steps.

Backend interface (shared with ``cpu`` and ``triton``): ``forward(costs, n, m, W, gamma)`` takes a list
of cost tensors ``[B_k, N_k, M_k]`` whose pairs are numbered consecutively (``P = sum B_k``) and the
per-pair lists ``n``, ``m``, ``W`` (lengths and band, see ``_common``); it returns the values ``[P]``
and a tuple of tensors to save. ``backward(costs, saved, n, m, W, gamma, grad)`` returns
``grad[p] * dR[n, m] / dC`` for every cost tensor. The list is packed into one padded tensor and the
gradients unpacked by ``_common.pack_costs`` / ``unpack_grads``, which the fast paths share.
"""

from __future__ import annotations

import torch

from ._common import BIG, pack_costs, unpack_grads


def _per_pair(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=torch.int64)[:, None]


def _diagonal(d: int, N: int, M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based cell indices ``(i, j)`` of anti-diagonal ``i + j = d`` inside ``[1, N] x [1, M]``."""
    i = torch.arange(max(1, d - M), min(N, d - 1) + 1, device=device)
    return i, d - i


def forward(costs: list[torch.Tensor], n: list[int], m: list[int], W: list[int],
            gamma: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Soft-DTW values ``R[p, n_p, m_p]`` and the saved table ``R: [P, N + 1, M + 1]``."""
    C = pack_costs(costs)
    P, N, M = C.shape
    n_t, m_t, w_t = _per_pair(n, C), _per_pair(m, C), _per_pair(W, C)
    R = C.new_full((P, N + 1, M + 1), BIG)
    R[:, 0, 0] = 0.0
    for d in range(2, N + M + 1):
        i, j = _diagonal(d, N, M, C.device)
        r = torch.stack((R[:, i - 1, j - 1], R[:, i - 1, j], R[:, i, j - 1]))  # [3, P, k]
        r_min = r.min(0).values
        softmin = r_min - gamma * torch.log(torch.exp((r_min - r) / gamma).sum(0))
        in_band = (i * m_t - j * n_t).abs() <= w_t  # [P, k]
        R[:, i, j] = torch.where(in_band, C[:, i - 1, j - 1] + softmin, BIG)
    values = R[torch.arange(P, device=C.device), n_t[:, 0], m_t[:, 0]]
    return values, (R,)


def backward(costs: list[torch.Tensor], saved: tuple[torch.Tensor, ...], n: list[int], m: list[int],
             W: list[int], gamma: float, grad: torch.Tensor) -> list[torch.Tensor]:
    """``grad[p] * E[p]`` per cost tensor, with ``E`` the expected alignment (zero outside each pair)."""
    (R,) = saved
    C = pack_costs(costs)
    P, N, M = C.shape
    n_t, m_t, w_t = _per_pair(n, C), _per_pair(m, C), _per_pair(W, C)
    rows = torch.arange(1, N + 1, device=C.device)[None, :, None]
    cols = torch.arange(1, M + 1, device=C.device)[None, None, :]
    inside = (rows <= n_t[:, :, None]) & (cols <= m_t[:, :, None])
    inside &= (rows * m_t[:, :, None] - cols * n_t[:, :, None]).abs() <= w_t[:, :, None]
    # S = R - C is the softmin a cell received; -BIG outside a pair so no E flows out of there.
    S = R.new_full((P, N + 2, M + 2), -BIG)
    S[:, 1:N + 1, 1:M + 1] = torch.where(inside, R[:, 1:, 1:] - C, -BIG)
    E = R.new_zeros((P, N + 2, M + 2))
    E[torch.arange(P, device=C.device), n_t[:, 0], m_t[:, 0]] = 1.0
    for d in range(N + M, 1, -1):
        i, j = _diagonal(d, N, M, C.device)
        r = R[:, i, j]
        total = E[:, i, j]  # the seed 1 at (n, m), 0 elsewhere
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            # softmin <= every argument, so the exponent is <= 0 in exact arithmetic: clamp the rounding.
            weight = torch.exp(torch.clamp_max(S[:, i + di, j + dj] - r, 0.0) / gamma)
            total = total + E[:, i + di, j + dj] * weight
        E[:, i, j] = torch.where(inside[:, i - 1, j - 1], total, 0.0)
    E = E[:, 1:N + 1, 1:M + 1] * grad[:, None, None]
    return unpack_grads(E, costs)
