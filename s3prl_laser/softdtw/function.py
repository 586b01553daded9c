"""The autograd Function shared by every backend, and backend selection.

``SoftDTWFunction.apply(impl, gamma, n, m, W, *costs)`` evaluates soft-DTW for all pairs of all cost
tensors in one call of the backend (one kernel launch per direction for the three divergence terms)
and returns the values ``[P]``; its backward is the backend's ``E`` recursion.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from . import reference

log = logging.getLogger(__name__)
_warned_cpu_fallback = False


class SoftDTWFunction(torch.autograd.Function):
    """Soft-DTW over a list of cost tensors ``[B_k, N_k, M_k]`` -> values ``[sum B_k]``."""

    @staticmethod
    def forward(ctx, impl: ModuleType, gamma: float, n: list[int], m: list[int], W: list[int],
                *costs: torch.Tensor) -> torch.Tensor:
        costs = [c.contiguous() for c in costs]
        values, saved = impl.forward(costs, n, m, W, gamma)
        ctx.save_for_backward(*costs, *saved)
        ctx.n_costs, ctx.impl, ctx.gamma, ctx.lengths = len(costs), impl, gamma, (n, m, W)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        tensors = ctx.saved_tensors
        costs, saved = list(tensors[: ctx.n_costs]), tuple(tensors[ctx.n_costs:])
        n, m, W = ctx.lengths
        grads = ctx.impl.backward(costs, saved, n, m, W, ctx.gamma, grad.contiguous())
        return (None, None, None, None, None, *grads)


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    banded: bool = False) -> ModuleType:  # fmt: skip
    """Module implementing ``backend`` for ``dtype`` tensors on ``device``; ``ValueError`` if it cannot run
    there.

    ``"auto"``: the Triton kernels for CUDA tensors, once they matched the reference on random cases (a
    small one and a multi-tile one, with a band when ``banded``) in this process (:mod:`.selfcheck`; else
    one warning and the reference), the compiled CPU kernel
    otherwise; when the CPU kernel cannot be built (no C compiler), ``"auto"`` logs one warning and uses
    the reference.
    """
    global _warned_cpu_fallback
    if backend == "reference":
        return reference
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        if not _triton_usable(device):
            raise ValueError(f"soft-DTW: backend='triton' needs CUDA tensors (got {device}); on the CPU it "
                             "runs only under TRITON_INTERPRET=1 (tests). Use backend='cpu' or 'auto'.")
        from . import triton_backend

        if backend == "auto":
            from .selfcheck import checked

            return checked(triton_backend, device, dtype, banded)
        return triton_backend
    if device.type != "cpu":
        raise ValueError(f"soft-DTW: backend={backend!r} has no kernel for {device} tensors; "
                         "use backend='reference' or 'auto'")
    from . import cpu_backend

    if backend == "cpu":
        cpu_backend.load_library()  # raises KernelBuildError (a RuntimeError) without a compiler
        return cpu_backend
    try:
        cpu_backend.load_library()
    except cpu_backend.KernelBuildError as err:
        if not _warned_cpu_fallback:
            log.warning("soft-DTW: the fast CPU kernel is unavailable (%s); using the slower reference", err)
            _warned_cpu_fallback = True
        return reference
    return cpu_backend
