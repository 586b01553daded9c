"""The fast GPU engine proves itself before it trains: one small random case against the reference.

On the first call per (device, dtype) in a process, :func:`checked` runs the engine's forward and backward
on a random batch of odd-sized pairs (unequal lengths, one with padding) and compares values and gradients
with :mod:`.reference`. A mismatch, or an engine that fails to compile or run, logs one warning naming the
difference and the reference engine is used for that (device, dtype) from then on: slower, never wrong
gradients. ``backend="auto"`` goes through this check; an engine named explicitly is used as asked.

Example::

    >>> from s3prl_laser.softdtw import reference
    >>> checked(reference, torch.device("cpu"), torch.float32) is reference
    True
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from . import reference
from ._common import band_widths

log = logging.getLogger(__name__)
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-12)}  # (rtol, atol) by dtype
_verdicts: dict[tuple[str, str, torch.dtype], bool] = {}


def checked(impl: ModuleType, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """``impl`` if it agrees with the reference on ``device`` in ``dtype`` (checked once per process),
    else the reference (after one warning)."""
    key = (impl.__name__, str(device), dtype)
    if key not in _verdicts:
        problem = _compare(impl, device, dtype)
        _verdicts[key] = problem is None
        if problem is not None:
            log.warning("soft-DTW: the %s engine on %s (%s) %s; using the reference engine instead "
                        "(slower, same results)", impl.__name__.rsplit(".", 1)[-1], device, dtype, problem)
    return impl if _verdicts[key] else reference


def _compare(impl: ModuleType, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``impl`` matches the reference on a small random case, else what went wrong."""
    generator = torch.Generator().manual_seed(0)
    n, m = [7, 4, 1], [5, 6, 3]
    W = band_widths(n, m, None)
    costs = [torch.rand(3, 7, 6, generator=generator, dtype=dtype).to(device)]
    grad = torch.rand(3, generator=generator, dtype=dtype).to(device)
    try:
        values, saved = impl.forward(costs, n, m, W, 0.1)
        grads = impl.backward(costs, saved, n, m, W, 0.1, grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # a compile or launch failure: the reference still works
        return f"failed to run ({type(error).__name__}: {error})"
    want_values, want_saved = reference.forward(costs, n, m, W, 0.1)
    want_grads = reference.backward(costs, want_saved, n, m, W, 0.1, grad)
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    for what, got, want in (("values", [values], [want_values]), ("gradients", grads, want_grads)):
        for a, b in zip(got, want, strict=True):
            if a.shape != b.shape or not torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol):
                error = float((a.to(b.dtype) - b).abs().max()) if a.shape == b.shape else float("nan")
                return f"disagrees with the reference on {what} (largest difference {error:.3g})"
    return None
