"""Fast CPU backend: the plain-C kernel ``sdtw_cpu.c``, compiled on first use and called via ctypes.

The kernel keeps the DP table as ``[N + 1, M + 1, LANES]`` and vectorises each cell update over up
to LANES pairs ("lanes", 8 or 16: one build per width, the narrower one for groups of up to 8 pairs, so
padding lanes waste neither time nor memory); the lanes of a call are split into groups that run on
``torch.get_num_threads()`` Python threads (ctypes releases the GIL, so they run in parallel).

Build: :mod:`s3prl_laser.cbuild`, the system C compiler (``$CC``, else ``cc``/``gcc``) with ``-O3
-ffast-math -march=native``, into ``$S3PRL_LASER_HOME`` (default ``~/.cache/s3prl_laser``) under a name
keyed by a hash of the source, flags and CPU; written atomically, so concurrent first uses are safe.
Without a compiler, :func:`load_library` raises :class:`KernelBuildError`.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from s3prl_laser import cbuild
from s3prl_laser.cbuild import (
    KernelBuildError,  # noqa: F401  (part of this module's API)
    address,
    cache_dir,  # noqa: F401  (part of this module's API)
)

LANE_WIDTHS = (8, 16)  # the -DLANES builds of sdtw_cpu.c
SOURCE = Path(__file__).with_name("sdtw_cpu.c")
_SUFFIX = {torch.float32: "float", torch.float64: "double"}

SMALL_WORK = 1 << 18  # cells x lanes below which one thread does everything (threads cost more)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """Compile (once per source/CPU) and load the kernel; raises :class:`KernelBuildError` on failure."""
    global _library
    with _lock:
        if _library is None:
            variants = [[f"-DSDTW_REAL={real}", f"-DLANES={lanes}"]
                        for real in _SUFFIX.values() for lanes in LANE_WIDTHS]
            path = cbuild.build(SOURCE, variants, "the soft-DTW CPU kernel",
                                "use backend='reference' instead")
            _library = cbuild.load(path, [f"sdtw_{way}_{real}_{lanes}" for way in ("forward", "backward")
                                          for real in _SUFFIX.values() for lanes in LANE_WIDTHS])
    return _library


def _groups(P: int, cells: int) -> list[range]:
    """Split ``P`` lanes into groups of at most 16, one group per thread when there is enough work."""
    threads = torch.get_num_threads() if cells * P >= SMALL_WORK else 1
    count = max(-(-P // LANE_WIDTHS[-1]), min(threads, P))
    bounds = [round(k * P / count) for k in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _lane_table(costs: list[torch.Tensor], n: list[int], m: list[int], W: list[int],
                outs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """int64 ``[8, P]``: n, m, W, cost address, row stride, rows, cols, output address per lane."""
    cols = []
    for k, c in enumerate(costs):
        elem = c.element_size()
        for b in range(c.shape[0]):
            out_addr = outs[k].data_ptr() + b * outs[k].stride(0) * elem if outs is not None else 0
            addr = c.data_ptr() + b * c.stride(0) * elem
            cols.append((addr, c.stride(1), c.shape[1], c.shape[2], out_addr))
    addr, stride, rows, ncols, out = zip(*cols, strict=True)
    return torch.tensor([n, m, W, addr, stride, rows, ncols, out], dtype=torch.int64)


def _width(group: range) -> int:
    """The narrowest kernel build that holds the group's lanes."""
    return next(w for w in LANE_WIDTHS if len(group) <= w)


def forward(costs: list[torch.Tensor], n: list[int], m: list[int], W: list[int],
            gamma: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Values ``[P]``; saves the lane-group bounds and one ``R`` table per group (see ``reference.py``)."""
    library, dtype = load_library(), costs[0].dtype
    real = _real(dtype)
    table = _lane_table(costs, n, m, W)
    values = torch.empty(len(n), dtype=dtype)
    groups = _groups(len(n), max(n) * max(m))
    tables, alive, calls = [], [], []  # alive: buffers the C code points into, until it returns
    for group in groups:
        lanes = table[:, group.start:group.stop].contiguous()
        N, M = int(lanes[0].max()), int(lanes[1].max())
        width = _width(group)
        R = torch.empty((N + 1) * (M + 1) * width, dtype=dtype)
        buf = torch.empty(2 * (M + 2) * width, dtype=dtype)  # two cost rows
        tables.append(R)
        alive += [lanes, buf]
        calls.append((getattr(library, f"sdtw_forward_{_SUFFIX[dtype]}_{width}"),
                      ctypes.c_int64(len(group)), ctypes.c_int64(N), ctypes.c_int64(M),
                      *(address(lanes, k * len(group)) for k in range(5)), real(gamma), address(R),
                      address(buf), address(values, group.start)))
    cbuild.run_parallel(calls)
    bounds = torch.tensor([g.start for g in groups] + [groups[-1].stop])
    return values, (bounds, *tables)


def backward(costs: list[torch.Tensor], saved: tuple[torch.Tensor, ...], n: list[int], m: list[int],
             W: list[int], gamma: float, grad: torch.Tensor) -> list[torch.Tensor]:
    """``grad[p] * E`` per cost tensor, written by the kernel straight into fresh tensors."""
    library, dtype = load_library(), costs[0].dtype
    real = _real(dtype)
    outs = [torch.empty_like(c) for c in costs]
    table = _lane_table(costs, n, m, W, outs)
    grad = grad.to(dtype).contiguous()
    bounds, tables = saved[0].tolist(), saved[1:]
    groups = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    alive, calls = [], []  # alive: buffers the C code points into, until it returns
    for group, R in zip(groups, tables, strict=True):
        lanes = table[:, group.start:group.stop].contiguous()
        N, M = int(lanes[0].max()), int(lanes[1].max())
        width = _width(group)
        work = torch.empty(5 * (M + 2) * width, dtype=dtype)
        alive += [lanes, work]
        k = len(group)
        calls.append((getattr(library, f"sdtw_backward_{_SUFFIX[dtype]}_{width}"),
                      ctypes.c_int64(k), ctypes.c_int64(N), ctypes.c_int64(M),
                      *(address(lanes, i * k) for i in range(8)), address(grad, group.start), real(gamma),
                      address(R), address(work)))
    cbuild.run_parallel(calls)
    return outs


def _real(dtype: torch.dtype):
    if dtype not in _SUFFIX:
        raise ValueError(f"soft-DTW cpu backend: unsupported dtype {dtype}")
    return ctypes.c_float if dtype == torch.float32 else ctypes.c_double
