"""The LASER objective: soft-DTW divergence between two views plus the contrastive-IDM regulariser.

Shapes: ``z1: [B, N, D]`` and ``z2: [B, M, D]`` are per-frame projections of the clean and the perturbed
view (L2-normalised by :class:`ProjectionHead`), ``lengths1: [B]`` and ``lengths2: [B]`` the number of
valid frames of each utterance (frames past them are padding and contribute nothing).

Per pair (the formulas in full: ``docs/method.md``)::

    L = D_gamma(z1, z2) + alpha * (IDM(z1) + IDM(z2))

with ``D_gamma`` the soft-DTW divergence (squared-Euclidean frame cost) and ``IDM`` the contrastive
inverse-difference-moment term of "Learning by Aligning Videos" (LAV), as in the official LASER code
(``loss_type="softdtw_lav"``). ``loss_type="softdtw"`` is the paper's ablation without the regulariser.

Example::

    >>> head, loss_fn = ProjectionHead(768), LaserLoss()
    >>> out = loss_fn(head(torch.randn(2, 50, 768)), head(torch.randn(2, 45, 768)))
    >>> out.loss.backward()
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from s3prl_laser.names import LOSS_TYPES
from s3prl_laser.softdtw import pairwise_sq_dist, soft_dtw_divergence


def _valid_frames(lengths: torch.Tensor | None, batch: int, frames: int, device: torch.device, name: str):
    """Valid-frame mask ``[B, T]`` and lengths ``[B]`` (all ``T`` when ``lengths`` is None)."""
    if lengths is None:
        lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one per utterance), got {list(lengths.shape)}")
    if bool(((lengths < 1) | (lengths > frames)).any()):
        raise ValueError(f"{name} must lie in [1, {frames}] (the padded frame count), got {lengths.tolist()}")
    mask = torch.arange(frames, device=device)[None, :] < lengths[:, None]
    return mask, lengths


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    """``z`` in float32, unless it is float64 (kept, so that float64 callers get float64 accuracy)."""
    return z if z.dtype == torch.float64 else z.float()


def temporal_regularizer(
    z: torch.Tensor, lengths: torch.Tensor | None = None, sigma: int = 0, margin: float = 1.1
) -> torch.Tensor:
    """Contrastive-IDM temporal regulariser of each utterance, ``[B]``.

    For utterance ``b`` with ``n = lengths[b]`` valid frames ``z_1..z_n`` (rows of ``z[b]``)::

        d_ij = ||z_i - z_j||            (Euclidean, not squared)
        y_ij = 0 if |i - j| <= sigma else 1
        IDM  = 1/n^2 * sum_ij [ y_ij ((i-j)^2 + 1) relu(margin - d_ij) + (1 - y_ij) d_ij / ((i-j)^2 + 1) ]

    Distant frames closer than ``margin`` are pushed apart (weighted by their temporal distance), neighbours
    (``|i - j| <= sigma``) are pulled together. Computed in float32 (autocast is switched off inside and
    half-precision inputs are cast up), or in float64 when ``z`` is float64, with ``[B, T, T]`` memory; the
    distance has a zero gradient where it is 0 (the diagonal), so gradients stay finite, and padding frames
    get exactly zero gradient.

    Args:
        z: ``[B, T, D]`` frame projections, normally L2-normalised.
        lengths: ``[B]`` valid frames per utterance; None means all ``T``.
        sigma: temporal window of the neighbours (the paper: 0, only ``i = j``).
        margin: the contrastive margin (HuBERT preset 1.1, WavLM preset 1.0).

    Example::

        >>> z = F.normalize(torch.randn(2, 30, 256), dim=-1)
        >>> temporal_regularizer(z, torch.tensor([30, 21])).shape
        torch.Size([2])
    """
    if z.dim() != 3:
        raise ValueError(f"z must be [B, T, D] (batch, frames, features), got shape {tuple(z.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (frames of the neighbour window), got {sigma}")
    mask, lengths = _valid_frames(lengths, z.shape[0], z.shape[1], z.device, "lengths")
    return _idm(z, mask, lengths, sigma, margin)


def _idm(
    z: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, sigma: int, margin: float
) -> torch.Tensor:
    """:func:`temporal_regularizer` on checked ``mask [B, T]``, ``lengths [B]`` (from ``_valid_frames``)."""
    frames = z.shape[1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _at_least_float32(z)
        sq = pairwise_sq_dist(z)
        steps = torch.arange(frames, device=z.device)
        gap = (steps[:, None] - steps[None, :]).abs()
        # d_ii = 0 exactly (the Gram form leaves rounding noise there); sqrt is only taken of positive
        # values so that its gradient is finite everywhere, and 0 where the distance is 0.
        positive = (sq > 0) & (gap > 0)
        dist = torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)
        w_bar = (gap.to(z.dtype) ** 2 + 1)[None]
        neighbour = (gap <= sigma)[None]
        terms = torch.where(neighbour, dist / w_bar, w_bar * F.relu(margin - dist))
        pair_mask = mask[:, :, None] & mask[:, None, :]
        terms = torch.where(pair_mask, terms, 0.0)
        return terms.sum((1, 2)) / lengths.to(z.dtype) ** 2


class LaserLossOutput(NamedTuple):
    """What :class:`LaserLoss` returns.

    ``loss``: scalar, mean over pairs of ``alignment + alpha * regularizer`` (the tensor to backpropagate).
    ``alignment``: ``[B]`` soft-DTW divergence of each pair.
    ``regularizer``: ``[B]`` ``IDM(z1) + IDM(z2)`` of each pair, unweighted by alpha (with
    ``loss_type="softdtw"`` it is still computed, detached, so that collapse can be watched in the logs).
    """

    loss: torch.Tensor
    alignment: torch.Tensor
    regularizer: torch.Tensor


class LaserLoss(nn.Module):
    """The LASER loss over a batch of (clean, perturbed) pairs.

    Args:
        gamma: soft-DTW smoothing (paper: 0.1).
        alpha: weight of the temporal regulariser (HuBERT preset 0.4, WavLM preset 0.15).
        sigma: neighbour window of the regulariser (paper: 0).
        margin: contrastive margin of the regulariser (HuBERT preset 1.1, WavLM preset 1.0).
        loss_type: ``"softdtw_lav"`` (divergence + regulariser, the method) or ``"softdtw"`` (divergence only,
            the paper's ablation).
        bandwidth: optional Sakoe-Chiba band of the soft-DTW (None: full matrix, as in the paper).
        backend: soft-DTW backend passed to :func:`s3prl_laser.softdtw.soft_dtw_divergence`.

    ``forward(z1 [B, N, D], z2 [B, M, D], lengths1 [B] | None, lengths2 [B] | None) -> LaserLossOutput``.
    The soft-DTW and the regulariser run in float32 even under bf16/fp16 autocast (inputs are cast up);
    float64 inputs stay float64 throughout.

    Example::

        >>> loss_fn = LaserLoss(alpha=0.4, margin=1.1)
        >>> z1 = F.normalize(torch.randn(2, 40, 256), dim=-1)
        >>> z2 = F.normalize(torch.randn(2, 36, 256), dim=-1)
        >>> loss_fn(z1, z2, torch.tensor([40, 31]), torch.tensor([36, 28])).loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        gamma: float = 0.1,
        alpha: float = 0.4,
        sigma: int = 0,
        margin: float = 1.1,
        loss_type: str = "softdtw_lav",
        bandwidth: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if gamma <= 0:
            raise ValueError(f"gamma (soft-DTW smoothing) must be > 0, got {gamma}")
        if alpha < 0:
            raise ValueError(f"alpha (regulariser weight) must be >= 0, got {alpha}")
        if sigma < 0:
            raise ValueError(f"sigma (regulariser window) must be >= 0, got {sigma}")
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.sigma, self.margin = int(sigma), float(margin)
        self.loss_type, self.bandwidth, self.backend = loss_type, bandwidth, backend

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type!r}, gamma={self.gamma}, alpha={self.alpha}, sigma={self.sigma}, "
            f"margin={self.margin}, bandwidth={self.bandwidth}, backend={self.backend!r}"
        )

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        lengths1: torch.Tensor | None = None,
        lengths2: torch.Tensor | None = None,
    ) -> LaserLossOutput:
        if z1.dim() != 3 or z2.dim() != 3:
            raise ValueError(f"z1 and z2 must be [B, T, D], got shapes {list(z1.shape)} and {list(z2.shape)}")
        if z1.shape[0] != z2.shape[0] or z1.shape[2] != z2.shape[2]:
            raise ValueError(
                f"z1 and z2 must share batch size and feature size, got {list(z1.shape)} and {list(z2.shape)}"
            )
        mask1, lengths1 = _valid_frames(lengths1, z1.shape[0], z1.shape[1], z1.device, "lengths1")
        mask2, lengths2 = _valid_frames(lengths2, z2.shape[0], z2.shape[1], z2.device, "lengths2")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            alignment = soft_dtw_divergence(
                _at_least_float32(z1),
                _at_least_float32(z2),
                gamma=self.gamma,
                x_lengths=lengths1,
                y_lengths=lengths2,
                bandwidth=self.bandwidth,
                backend=self.backend,
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.loss_type == "softdtw_lav"):
            regularizer = _idm(z1, mask1, lengths1, self.sigma, self.margin) + _idm(
                z2, mask2, lengths2, self.sigma, self.margin
            )
        if self.loss_type == "softdtw_lav":
            loss = (alignment + self.alpha * regularizer).mean()
        else:
            loss = alignment.mean()
        return LaserLossOutput(loss=loss, alignment=alignment, regularizer=regularizer)


class ProjectionHead(nn.Module):
    """Linear projection followed by per-frame L2 normalisation: ``[..., in_dim] -> [..., out_dim]``.

    Example::

        >>> head = ProjectionHead(768, 256)
        >>> head(torch.randn(2, 50, 768)).norm(dim=-1)  # all ones
    """

    def __init__(self, in_dim: int, out_dim: int = 256) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(hidden), dim=-1)
