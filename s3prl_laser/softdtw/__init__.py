"""Soft-DTW engine: values and gradients of soft-DTW and its divergence for padded batches.

Backends: ``"reference"`` (pure PyTorch, any device, float64: the oracle), ``"triton"`` (GPU kernels;
CPU tensors only under ``TRITON_INTERPRET=1``), ``"cpu"`` (a small C kernel compiled on first use),
``"auto"`` (triton on CUDA, cpu otherwise; falls back to the reference with one logged warning when
no C compiler is available).

Layer 1, ``softdtw``: knows nothing of speech; may import layer 0 and triton.

>>> import torch
>>> from s3prl_laser.softdtw import soft_dtw_divergence
>>> x, y = torch.randn(2, 50, 16), torch.randn(2, 60, 16)
>>> soft_dtw_divergence(x, y, gamma=0.1, y_lengths=[60, 41]).shape
torch.Size([2])
"""

from ._common import BACKENDS
from .api import SoftDTW, SoftDTWDivergence, soft_dtw, soft_dtw_divergence, soft_dtw_from_cost
from .cost import pairwise_sq_dist

__all__ = [
    "BACKENDS",
    "SoftDTW",
    "SoftDTWDivergence",
    "pairwise_sq_dist",
    "soft_dtw",
    "soft_dtw_divergence",
    "soft_dtw_from_cost",
]
