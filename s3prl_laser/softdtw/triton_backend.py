"""Triton backend: one forward and one backward launch for all pairs (all divergence terms at once).

Each program owns one pair and walks its anti-diagonals (``i + j = d``, ``d = 2 .. n + m``) in order,
in tiles of ``BLOCK`` cells, with a block-wide barrier between diagonals, so sequences of any length
work (no 1024-frame cap) and each pair only visits its own ``n x m`` cells. Memory: the packed cost
``C``, the table ``R: [P, N + 1, M + 1]`` and the gradient ``[P, N, M]``; never a ``[B, N, M, D]``
tensor (the cost comes from a matrix product, ``_common``).
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The backend interface
is the one described in ``reference.py``.

Loops over diagonals and tiles are ``while`` loops on per-pair scalars: the compiled kernel gets the
same control flow as with ``range`` (uniform across the block, so every thread reaches each barrier),
and every Triton interpreter takes them as they are (``range`` needs ``int()`` of a loaded scalar, which
the Triton 3.4 interpreter cannot do with NumPy 2). Every load and store is masked to the program's own
pair: cells ``(i, j)`` with ``1 <= i <= n``, ``1 <= j <= m`` of a diagonal, their predecessors, row and
column 0 up to ``m`` and ``n``, and the single end cell ``R[n, m]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BIG, pack_costs, unpack_grads

MAX_BLOCK = 1024  # the widest tile: cells of one diagonal that a program computes at once


def launch_config(N: int, M: int, max_block: int = MAX_BLOCK) -> dict[str, int]:
    """Tile size and warps from the problem size: a tile covers the longest anti-diagonal, up to
    ``max_block`` cells (a power of two; longer diagonals take several tiles)."""
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"soft-DTW: max_block must be a power of two, got {max_block}")
    block = min(triton.next_power_of_2(max(min(N, M), 16)), max_block)
    return {"BLOCK": block, "num_warps": max(1, min(block // 64, 8))}


@triton.jit
def _fill_borders(R, n, m, row, BIG: tl.constexpr, BLOCK: tl.constexpr):
    """Row 0 and column 0 of one pair's table: ``R[0, 0] = 0``, ``R[0, 1..m] = R[1..n, 0] = BIG``."""
    lane = tl.arange(0, BLOCK)
    start = tl.full((), 0, tl.int32)
    while start <= tl.maximum(n, m):
        k = start + lane
        tl.store(R + k, tl.where(k == 0, 0.0, BIG).to(R.dtype.element_ty), mask=k <= m)
        tl.store(R + k * row, tl.full([BLOCK], BIG, R.dtype.element_ty), mask=(k >= 1) & (k <= n))
        start += BLOCK


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
    _fill_borders(R, n, m, row, BIG, BLOCK)
    tl.debug_barrier()
    lane = tl.arange(0, BLOCK)
    d = tl.full((), 2, tl.int32)
    while d <= n + m:
        start = tl.maximum(1, d - m)  # cells i = start .. min(n, d - 1) of diagonal d, a tile at a time
        while start <= tl.minimum(n, d - 1):
            i = start + lane
            j = d - i
            mask = (i <= n) & (j >= 1)  # i >= start keeps j <= m
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
            start += BLOCK
        tl.debug_barrier()
        d += 1
    tl.store(V + p, tl.load(R + n * row + m))


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
    d = n + m
    while d >= 2:
        start = tl.maximum(1, d - m)
        while start <= tl.minimum(n, d - 1):
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
            start += BLOCK
        tl.debug_barrier()
        d -= 1


def _pairs(n: list[int], m: list[int], W: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (n, m, W))


def forward(costs: list[torch.Tensor], n: list[int], m: list[int], W: list[int], gamma: float,
            max_block: int = MAX_BLOCK) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Values ``[P]`` and the table ``R`` (one launch, one program per pair; tiles of at most
    ``max_block`` cells)."""
    C = pack_costs(costs).contiguous()
    P, N, M = C.shape
    R = C.new_empty((P, N + 1, M + 1))
    values = C.new_empty(P)
    _softdtw_forward_kernel[(P,)](C, R, values, *_pairs(n, m, W, C.device), N, M, gamma, BIG=BIG,
                                  **launch_config(N, M, max_block))
    return values, (R,)


def backward(costs: list[torch.Tensor], saved: tuple[torch.Tensor, ...], n: list[int], m: list[int],
             W: list[int], gamma: float, grad: torch.Tensor,
             max_block: int = MAX_BLOCK) -> list[torch.Tensor]:
    """``grad[p] * E[p]`` per cost tensor (one launch), zero outside each pair."""
    (R,) = saved
    C = pack_costs(costs).contiguous()
    P, N, M = C.shape
    G = torch.zeros_like(C)
    _softdtw_backward_kernel[(P,)](C, R, G, grad.to(C.dtype).contiguous(), *_pairs(n, m, W, C.device), N, M,
                                   gamma, BIG=BIG, **launch_config(N, M, max_block))
    return unpack_grads(G, costs)
