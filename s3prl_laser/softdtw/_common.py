"""Shared pieces of the soft-DTW engine: input checks, per-pair lengths and bands, dtypes, padding, packing.

Conventions used by every backend (reference, triton, cpu):

- a *pair* ``p`` has its own lengths ``n[p]``, ``m[p]`` (1 <= n <= N, 1 <= m <= M); cells outside
  ``[1, n] x [1, m]`` never influence ``R[n, m]`` and receive exactly zero gradient;
- the Sakoe-Chiba band is taken around the slope-scaled diagonal (the line from ``(0, 0)`` to
  ``(n, m)``): cell ``(i, j)`` (1-based) is inside iff ``|i * m - j * n| <= W`` with
  ``W = floor(max(bandwidth, 1) * max(n, m))``, i.e. at most ``max(bandwidth, 1)`` frames of the
  shorter sequence off that line. For ``n == m`` this is the classic ``|i - j| <= bandwidth``; the
  half-width of at least one frame keeps the end cell reachable for any ``n, m``. No band: ``W = n * m``;
- "+inf" is the finite sentinel ``BIG`` so that exp/log never see inf - inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BIG = 1e30  # stands for +inf in R: exp(-(BIG - r) / gamma) == 0 for any reachable r
BACKENDS = ("auto", "reference", "triton", "cpu")


def check_gamma(gamma: float) -> float:
    """Return ``gamma`` as a float, or raise ``ValueError`` when it is not a positive finite number."""
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"soft-DTW: gamma must be a positive finite number, got {gamma}")
    return gamma


def check_bandwidth(bandwidth: float | None) -> float | None:
    """Return ``bandwidth`` as a float (``None``: no band); ``ValueError`` when negative or not finite."""
    if bandwidth is None:
        return None
    bandwidth = float(bandwidth)
    if not math.isfinite(bandwidth) or bandwidth < 0:
        raise ValueError(f"soft-DTW: bandwidth must be None or a finite number >= 0, got {bandwidth}")
    return bandwidth


def check_backend(backend: str) -> str:
    """Raise ``ValueError`` for a backend name that is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"soft-DTW: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def check_sequences(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check ``x: [B, N, D]`` and ``y: [B, M, D]`` (same batch, feature size, device, floating dtype)."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"soft-DTW: {name} must be a tensor [B, T, D], got {got}")
        if not t.is_floating_point():
            raise ValueError(f"soft-DTW: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"soft-DTW: {name} has an empty time or feature axis: {tuple(t.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"soft-DTW: x {tuple(x.shape)} and y {tuple(y.shape)} need the same B and D")
    if x.device != y.device:
        raise ValueError(f"soft-DTW: x is on {x.device} but y is on {y.device}")


def check_cost(cost: torch.Tensor) -> None:
    """Check a cost matrix ``C: [B, N, M]`` (floating point, non-empty)."""
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3 or 0 in cost.shape:
        got = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"soft-DTW: the cost matrix must be a non-empty tensor [B, N, M], got {got}")
    if not cost.is_floating_point():
        raise ValueError(f"soft-DTW: the cost matrix must be floating point, got {cost.dtype}")


def lengths_list(lengths: torch.Tensor | Sequence[int] | None, batch: int, full: int, name: str) -> list[int]:
    """Per-pair lengths as a Python list; ``None`` means every pair uses the full ``full`` frames.

    >>> lengths_list(torch.tensor([3, 5]), 2, 5, "x_lengths")
    [3, 5]
    """
    if lengths is None:
        return [full] * batch
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"soft-DTW: {name} must be a 1-D integer tensor, got {lengths.dtype} "
                             f"of shape {tuple(lengths.shape)}")
        values = [int(v) for v in lengths.tolist()]
    else:
        values = [int(v) for v in lengths]
    if len(values) != batch:
        raise ValueError(f"soft-DTW: {name} has {len(values)} entries for a batch of {batch}")
    bad = [v for v in values if not 1 <= v <= full]
    if bad:
        raise ValueError(f"soft-DTW: {name} must lie in [1, {full}] (the padded length), got {bad}")
    return values


def band_widths(n: Sequence[int], m: Sequence[int], bandwidth: float | None) -> list[int]:
    """Integer band half-widths ``W`` per pair (see the module docstring); ``n * m`` when there is no band."""
    if bandwidth is None:
        return [a * b for a, b in zip(n, m, strict=True)]
    return [int(math.floor(max(bandwidth, 1.0) * max(a, b))) for a, b in zip(n, m, strict=True)]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """DP dtype for an input dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_padding(x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Set frames ``t >= lengths[b]`` of ``x: [B, T, D]`` to zero (their gradient becomes exactly zero)."""
    if all(v == x.shape[1] for v in lengths):
        return x
    steps = torch.arange(x.shape[1], device=x.device)
    keep = steps[None, :] < torch.tensor(lengths, device=x.device)[:, None]
    return x.masked_fill(~keep[:, :, None], 0.0)


def pack_costs(costs: list[torch.Tensor]) -> torch.Tensor:
    """Stack cost tensors ``[B_k, N_k, M_k]`` into one zero-padded ``[P, max N_k, max M_k]``."""
    if len(costs) == 1:
        return costs[0]
    n_max = max(c.shape[1] for c in costs)
    m_max = max(c.shape[2] for c in costs)
    packed = costs[0].new_zeros(sum(c.shape[0] for c in costs), n_max, m_max)
    start = 0
    for c in costs:
        packed[start:start + c.shape[0], : c.shape[1], : c.shape[2]] = c
        start += c.shape[0]
    return packed


def unpack_grads(packed: torch.Tensor, costs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_costs` for the gradients (views into ``packed``)."""
    out, start = [], 0
    for c in costs:
        out.append(packed[start:start + c.shape[0], : c.shape[1], : c.shape[2]])
        start += c.shape[0]
    return out
