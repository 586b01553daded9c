"""The fast GPU engine proves itself before it trains: random cases against the reference.

On the first call per (device, dtype, band or not) in a process, :func:`checked` runs the engine's forward
and backward on two random batches of odd-sized pairs (unequal lengths, padding) and compares values and
gradients with :mod:`.reference`: a small batch, and one whose anti-diagonals are longer than one tile of the
engine, so that its multi-tile path runs (an engine whose ``forward``/``backward`` take ``max_block``, the
Triton kernels, is launched with tiles of :data:`TILE` cells; any other gets the same case as is). When the
calls use a Sakoe-Chiba band, both cases are checked with a band (:data:`BANDWIDTH` frames), which excludes
most cells. A mismatch, or an engine that fails to compile or run, logs one warning naming the case and the
difference, and the reference engine is used for that (device, dtype, band) from then on: slower, never
wrong gradients. ``backend="auto"`` goes through this check; an engine named explicitly is used as asked.

Example::

    >>> from s3prl_laser.softdtw import reference
    >>> checked(reference, torch.device("cpu"), torch.float32, banded=True) is reference
    True
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType

import torch

from . import reference
from ._common import band_widths

log = logging.getLogger(__name__)
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-12)}  # (rtol, atol) by dtype
TILE = 16  # tile (cells of one anti-diagonal) of the multi-tile case: its longest diagonal takes 3 of them
BANDWIDTH = 2.0  # frames off the diagonal in the banded cases
CASES = (  # (name, rows n and columns m per pair, tiles of TILE cells); the first pair is the longest
    ("small", [7, 4, 1], [5, 6, 3], False),
    (f"multi-tile ({TILE}-cell tiles)", [41, 37, 18], [39, 40, 26], True),
)
_verdicts: dict[tuple[str, str, torch.dtype, bool], bool] = {}


def checked(impl: ModuleType, device: torch.device, dtype: torch.dtype, banded: bool = False) -> ModuleType:
    """``impl`` if it agrees with the reference on ``device`` in ``dtype``, with a band or without one
    (checked once per process), else the reference (after one warning)."""
    key = (impl.__name__, str(device), dtype, banded)
    if key not in _verdicts:
        problem = _compare(impl, device, dtype, banded)
        _verdicts[key] = problem is None
        if problem is not None:
            log.warning("soft-DTW: the %s engine on %s (%s, %s) %s; using the reference engine instead "
                        "(slower, same results)", impl.__name__.rsplit(".", 1)[-1], device, dtype,
                        "with a band" if banded else "no band", problem)  # fmt: skip
    return impl if _verdicts[key] else reference


def _compare(impl: ModuleType, device: torch.device, dtype: torch.dtype, banded: bool = False) -> str | None:
    """None if ``impl`` matches the reference on every case of :data:`CASES`, else what went wrong where."""
    for seed, (name, n, m, tiled) in enumerate(CASES):
        problem = _compare_case(impl, device, dtype, n, m, BANDWIDTH if banded else None, seed, tiled)
        if problem is not None:
            return f"{problem} in the {name} case"
    return None


def _compare_case(impl: ModuleType, device: torch.device, dtype: torch.dtype, n: list[int], m: list[int],
                  bandwidth: float | None, seed: int, tiled: bool) -> str | None:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    W = band_widths(n, m, bandwidth)
    costs = [torch.rand(len(n), max(n), max(m), generator=generator, dtype=dtype).to(device)]
    grad = torch.rand(len(n), generator=generator, dtype=dtype).to(device)
    tile = {"max_block": TILE} if tiled and "max_block" in inspect.signature(impl.forward).parameters else {}
    try:
        values, saved = impl.forward(costs, n, m, W, 0.1, **tile)
        grads = impl.backward(costs, saved, n, m, W, 0.1, grad, **tile)
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
