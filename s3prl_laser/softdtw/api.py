"""Public soft-DTW functions and modules: ``soft_dtw``, ``soft_dtw_from_cost``, ``soft_dtw_divergence``.

All take padded batches plus optional per-pair lengths; padding never influences a value and gets
exactly zero gradient. Half-precision inputs are upcast (the DP runs in float32, values are float32);
float64 stays float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import (
    band_widths,
    check_backend,
    check_bandwidth,
    check_cost,
    check_gamma,
    check_sequences,
    lengths_list,
    state_dtype,
    zero_padding,
)
from .cost import pairwise_sq_dist
from .function import SoftDTWFunction, resolve_backend

Lengths = torch.Tensor | Sequence[int] | None


def soft_dtw_from_cost(cost: torch.Tensor, gamma: float = 0.1, x_lengths: Lengths = None,
                       y_lengths: Lengths = None, bandwidth: float | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """Soft-DTW ``R[n_b, m_b]`` of precomputed cost matrices ``cost: [B, N, M]`` -> ``[B]``.

    ``x_lengths``/``y_lengths``: ``[B]`` valid rows/columns per pair (default: all). ``bandwidth``:
    Sakoe-Chiba half-width in frames of the shorter sequence around the slope-scaled diagonal
    (at least 1, so the end cell stays reachable; ``None``: no band).
    ``backend``: "auto", "reference", "triton" or "cpu".

    >>> soft_dtw_from_cost(torch.rand(2, 5, 7), gamma=0.1, backend="reference").shape
    torch.Size([2])
    """
    check_cost(cost)
    gamma, bandwidth = check_gamma(gamma), check_bandwidth(bandwidth)
    B, N, M = cost.shape
    n = lengths_list(x_lengths, B, N, "x_lengths")
    m = lengths_list(y_lengths, B, M, "y_lengths")
    cost = cost.to(state_dtype(cost.dtype))
    impl = resolve_backend(check_backend(backend), cost.device, cost.dtype, bandwidth is not None)
    return SoftDTWFunction.apply(impl, gamma, n, m, band_widths(n, m, bandwidth), cost)


def _prepare(x, y, gamma, x_lengths, y_lengths, bandwidth, backend):
    check_sequences(x, y)
    gamma, bandwidth = check_gamma(gamma), check_bandwidth(bandwidth)
    B = x.shape[0]
    n = lengths_list(x_lengths, B, x.shape[1], "x_lengths")
    m = lengths_list(y_lengths, B, y.shape[1], "y_lengths")
    dtype = state_dtype(torch.promote_types(x.dtype, y.dtype))
    impl = resolve_backend(check_backend(backend), x.device, dtype, bandwidth is not None)
    x, y = zero_padding(x.to(dtype), n), zero_padding(y.to(dtype), m)
    return x, y, gamma, n, m, bandwidth, impl


def soft_dtw(x: torch.Tensor, y: torch.Tensor, gamma: float = 0.1, x_lengths: Lengths = None,
             y_lengths: Lengths = None, bandwidth: float | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Soft-DTW between ``x: [B, N, D]`` and ``y: [B, M, D]`` with squared-Euclidean cost -> ``[B]``.

    Gradients flow to ``x`` and ``y``. See :func:`soft_dtw_from_cost` for the other arguments.

    >>> x, y = torch.randn(2, 5, 3), torch.randn(2, 7, 3)
    >>> soft_dtw(x, y, gamma=0.1, y_lengths=[7, 4], backend="reference").shape
    torch.Size([2])
    """
    x, y, gamma, n, m, bandwidth, impl = _prepare(x, y, gamma, x_lengths, y_lengths, bandwidth, backend)
    return SoftDTWFunction.apply(impl, gamma, n, m, band_widths(n, m, bandwidth), pairwise_sq_dist(x, y))


def soft_dtw_divergence(x: torch.Tensor, y: torch.Tensor, gamma: float = 0.1, x_lengths: Lengths = None,
                        y_lengths: Lengths = None, bandwidth: float | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """Soft-DTW divergence ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` per pair -> ``[B]``.

    Each term uses the pair's own lengths; the three terms run in one backend call. The divergence
    is 0 for ``x == y``, symmetric and non-negative. Arguments as in :func:`soft_dtw`.

    >>> x = torch.randn(2, 5, 3)
    >>> soft_dtw_divergence(x, x, backend="reference").abs().max() < 1e-4
    tensor(True)
    """
    x, y, gamma, n, m, bandwidth, impl = _prepare(x, y, gamma, x_lengths, y_lengths, bandwidth, backend)
    lengths_n, lengths_m = n + n + m, m + n + m
    costs = (pairwise_sq_dist(x, y), pairwise_sq_dist(x), pairwise_sq_dist(y))
    values = SoftDTWFunction.apply(impl, gamma, lengths_n, lengths_m,
                                   band_widths(lengths_n, lengths_m, bandwidth), *costs)
    xy, xx, yy = values.split(x.shape[0])
    return xy - 0.5 * (xx + yy)


class SoftDTW(nn.Module):
    """Module form of :func:`soft_dtw` (settings fixed at construction, e.g. from a config).

    >>> SoftDTW(gamma=0.1, backend="reference")(torch.randn(2, 5, 3), torch.randn(2, 6, 3)).shape
    torch.Size([2])
    """

    def __init__(self, gamma: float = 0.1, bandwidth: float | None = None, backend: str = "auto"):
        super().__init__()
        self.gamma, self.bandwidth = check_gamma(gamma), check_bandwidth(bandwidth)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_lengths: Lengths = None,
                y_lengths: Lengths = None) -> torch.Tensor:
        return soft_dtw(x, y, self.gamma, x_lengths, y_lengths, self.bandwidth, self.backend)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, bandwidth={self.bandwidth}, backend={self.backend!r}"


class SoftDTWDivergence(SoftDTW):
    """Module form of :func:`soft_dtw_divergence` -> ``[B]`` (LASER uses ``gamma=0.1``).

    >>> SoftDTWDivergence(gamma=0.1, backend="reference")(torch.randn(2, 5, 3), torch.randn(2, 6, 3)).shape
    torch.Size([2])
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_lengths: Lengths = None,
                y_lengths: Lengths = None) -> torch.Tensor:
        return soft_dtw_divergence(x, y, self.gamma, x_lengths, y_lengths, self.bandwidth, self.backend)
