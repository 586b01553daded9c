"""Squared-Euclidean frame cost from one matrix product, with a hand-written backward.

``C[b, i, j] = ||x_bi||^2 + ||y_bj||^2 - 2 <x_bi, y_bj>`` (clamped at 0 against rounding); the
backward is ``dx = 2 (rowsum(G) x - G y)``, ``dy = 2 (colsum(G) y - G^T x)``: two matrix products and
no ``[B, N, M]`` temporaries beyond ``G`` itself. The self cost ``x`` against ``x`` (divergence terms)
needs one product: ``dx = 2 (rowsum(G + G^T) x - (G + G^T) x)``.
"""

from __future__ import annotations

import torch


class _SquaredDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        y_sq = y.pow(2).sum(-1).unsqueeze(1)  # [B, 1, M]
        cost = torch.baddbmm(y_sq, x, y.transpose(1, 2), alpha=-2.0)
        return cost.add_(x.pow(2).sum(-1, keepdim=True)).clamp_min_(0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        grad_x = torch.baddbmm(x * grad.sum(2, keepdim=True), grad, y, alpha=-1.0).mul_(2.0)
        grad_y = torch.baddbmm(y * grad.sum(1).unsqueeze(-1), grad.transpose(1, 2), x, alpha=-1.0).mul_(2.0)
        return grad_x, grad_y


class _SelfSquaredDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        sq = x.pow(2).sum(-1)
        cost = torch.baddbmm(sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2.0)
        return cost.add_(sq.unsqueeze(-1)).clamp_min_(0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)
        return torch.baddbmm(x * sym.sum(2, keepdim=True), sym, x, alpha=-1.0).mul_(2.0)


def pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean frame cost ``C[b, i, j] = ||x[b, i] - y[b, j]||^2`` -> ``[B, N, M]``.

    ``x: [B, N, D]``, ``y: [B, M, D]`` (``None``: ``x`` against itself, one matrix product less in the
    backward). Never builds a ``[B, N, M, D]`` tensor.

    >>> pairwise_sq_dist(torch.zeros(1, 2, 3), torch.ones(1, 4, 3))[0, 0, 0].item()
    3.0
    """
    if y is None:
        return _SelfSquaredDistance.apply(x)
    return _SquaredDistance.apply(x, y)
