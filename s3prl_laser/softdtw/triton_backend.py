"""Triton backend: one forward and one backward launch for all pairs (all divergence terms at once).

Each program owns one pair and walks its anti-diagonals (``i + j = d``, ``d = 2 .. n + m``) in order,
in tiles of ``BLOCK`` cells, with a block-wide barrier between diagonals, so sequences of any length
work (no 1024-frame cap) and each pair only visits its own ``n x m`` cells. Memory: the packed cost
``C``, the table ``R: [P, N + 1, M + 1]`` and the gradient ``[P, N, M]``; never a ``[B, N, M, D]``
tensor (the cost comes from a matrix product, ``_common``).
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The backend interface
is the one described in ``reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BIG
from .reference import pack_costs, unpack_grads


def launch_config(N: int, M: int) -> dict[str, int]:
    """Tile size and warps from the problem size: a tile covers the longest anti-diagonal, up to 1024."""
    block = min(triton.next_power_of_2(max(min(N, M), 16)), 1024)
    return {"BLOCK": block, "num_warps": max(1, min(block // 64, 8))}


@triton.jit
def _softdtw_forward_kernel(C, R, V, n_ptr, m_ptr, w_ptr, N, M, gamma, BIG: tl.constexpr,
                            BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + p).to(tl.int32)
    m = tl.load(m_ptr + p).to(tl.int32)
    w = tl.load(w_ptr + p)
    C += p * N * M
    R += p * (N + 1) * (M + 1)
    row = M + 1
    lane = tl.arange(0, BLOCK)
    for start in range(0, M + 1, BLOCK):  # R[0, j]: 0 at j == 0, +inf (BIG) after
        j = start + lane
        tl.store(R + j, tl.where(j == 0, 0.0, BIG).to(R.dtype.element_ty), mask=j <= m)
    for start in range(1, N + 1, BLOCK):  # R[i, 0] = +inf
        i = start + lane
        tl.store(R + i * row, tl.full([BLOCK], BIG, R.dtype.element_ty), mask=i <= n)
    tl.debug_barrier()
    for d in range(2, n + m + 1):
        for start in range(tl.maximum(1, d - m), tl.minimum(n, d - 1) + 1, BLOCK):
            i = start + lane
            j = d - i
            mask = (i <= n) & (j >= 1)
            here = i * row + j
            a = tl.load(R + here - row - 1, mask=mask, other=BIG)
            b = tl.load(R + here - row, mask=mask, other=BIG)
            c = tl.load(R + here - 1, mask=mask, other=BIG)
            low = tl.minimum(tl.minimum(a, b), c)
            total = tl.exp((low - a) / gamma) + tl.exp((low - b) / gamma) + tl.exp((low - c) / gamma)
            cost = tl.load(C + (i - 1) * M + (j - 1), mask=mask, other=0.0)
            value = cost + low - gamma * tl.log(total)
            in_band = tl.abs(i * m - j * n) <= w
            tl.store(R + here, tl.where(in_band, value, BIG), mask=mask)
        tl.debug_barrier()
    tl.store(V + p + lane, tl.load(R + n * row + m + lane), mask=lane == 0)


@triton.jit
def _successor_share(C, R, G, si, sj, r, mask, n, m, w, row, M, gamma):
    """E[si, sj] * exp((S[si, sj] - R[i, j]) / gamma) with S = R - C, 0 where (si, sj) is off the pair."""
    ok = mask & (si <= n) & (sj <= m) & (tl.abs(si * m - sj * n) <= w)
    cost = tl.load(C + (si - 1) * M + (sj - 1), mask=ok, other=0.0)
    s = tl.load(R + si * row + sj, mask=ok, other=0.0) - cost
    e = tl.load(G + (si - 1) * M + (sj - 1), mask=ok, other=0.0)
    # the softmin is <= each of its arguments: the exponent is <= 0 up to rounding
    return tl.where(ok, e * tl.exp(tl.minimum(s - r, 0.0) / gamma), 0.0)


@triton.jit
def _softdtw_backward_kernel(C, R, G, grad_ptr, n_ptr, m_ptr, w_ptr, N, M, gamma, BIG: tl.constexpr,
                             BLOCK: tl.constexpr):
    """G[p] = grad[p] * E[p] by the E recursion, run directly on the scaled values (it is linear)."""
    p = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + p).to(tl.int32)
    m = tl.load(m_ptr + p).to(tl.int32)
    w = tl.load(w_ptr + p)
    seed = tl.load(grad_ptr + p)
    C += p * N * M
    G += p * N * M
    R += p * (N + 1) * (M + 1)
    row = M + 1
    lane = tl.arange(0, BLOCK)
    for step in range(0, n + m - 1):  # d = n + m down to 2 (loops keep a positive step)
        d = n + m - step
        for start in range(tl.maximum(1, d - m), tl.minimum(n, d - 1) + 1, BLOCK):
            i = start + lane
            j = d - i
            mask = (i <= n) & (j >= 1)
            r = tl.load(R + i * row + j, mask=mask, other=BIG)
            total = tl.where((i == n) & (j == m), seed, 0.0)
            # successors (i + 1, j), (i, j + 1), (i + 1, j + 1) hand back E through their softmin weights
            total += _successor_share(C, R, G, i + 1, j, r, mask, n, m, w, row, M, gamma)
            total += _successor_share(C, R, G, i, j + 1, r, mask, n, m, w, row, M, gamma)
            total += _successor_share(C, R, G, i + 1, j + 1, r, mask, n, m, w, row, M, gamma)
            in_band = tl.abs(i * m - j * n) <= w
            tl.store(G + (i - 1) * M + (j - 1), tl.where(in_band, total, 0.0), mask=mask)
        tl.debug_barrier()


def _patch_interpreter_scalars() -> None:
    """Let the Triton 3.4 interpreter use scalar tensors as ``range`` bounds with NumPy 2.x.

    The interpreter stores scalars as 1-element arrays and converts them with ``int(array)``, which
    recent NumPy releases (2.4 here) reject for arrays that are not 0-d; this wraps its tensor patch
    to convert the single element instead. Applied only when the interpreter runs (CPU tensors under
    ``TRITON_INTERPRET=1``).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_fix", False):
        return

    def patch(tensor):
        original(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    patch._scalar_fix = True
    interpreter._patch_lang_tensor = patch


def _pairs(n: list[int], m: list[int], W: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (n, m, W))


def forward(costs: list[torch.Tensor], n: list[int], m: list[int], W: list[int],
            gamma: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Values ``[P]`` and the table ``R`` (one launch, one program per pair)."""
    C = pack_costs(costs).contiguous()
    if C.device.type == "cpu":
        _patch_interpreter_scalars()
    P, N, M = C.shape
    R = C.new_empty((P, N + 1, M + 1))
    values = C.new_empty(P)
    _softdtw_forward_kernel[(P,)](C, R, values, *_pairs(n, m, W, C.device), N, M, gamma, BIG=BIG,
                                  **launch_config(N, M))
    return values, (R,)


def backward(costs: list[torch.Tensor], saved: tuple[torch.Tensor, ...], n: list[int], m: list[int],
             W: list[int], gamma: float, grad: torch.Tensor) -> list[torch.Tensor]:
    """``grad[p] * E[p]`` per cost tensor (one launch), zero outside each pair."""
    (R,) = saved
    C = pack_costs(costs).contiguous()
    P, N, M = C.shape
    G = torch.zeros_like(C)
    _softdtw_backward_kernel[(P,)](C, R, G, grad.to(C.dtype).contiguous(), *_pairs(n, m, W, C.device), N, M,
                                   gamma, BIG=BIG, **launch_config(N, M))
    return unpack_grads(G, costs)
