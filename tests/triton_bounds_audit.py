"""Bounds audit for Triton kernels run by the interpreter: program ``p`` touches only slice ``p``.

Under ``TRITON_INTERPRET=1`` loads and stores read and write raw host memory with no bounds check, so a
lane that a GPU would fault on (or that silently reads the next pair's data) passes unnoticed. Our
kernels run one pair per program on tensors ``[P, ...]``: every active lane of every access made by
program ``p`` must lie inside slice ``p`` of one of the launch's tensor arguments.

The audit wraps three interpreter internals that have the same names and signatures in Triton 3.4 and
3.8 (``GridExecutor.__call__``, ``InterpreterBuilder.create_masked_load`` / ``create_masked_store``,
through which unmasked loads and stores also go); the interpreter suite runs on both versions, and
``test_interpreted_audit_flags_a_read_past_the_row`` shows that it catches a real overrun.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


@dataclass
class Report:
    """Active lanes checked, and the first offending access of each kind as (kind, program, address)."""

    lanes: int = 0
    violations: list[tuple[str, int, int]] = field(default_factory=list)


def _slices(tensors: list[torch.Tensor], p: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of slice ``p`` of each contiguous tensor ``[P, ...]``."""
    ranges = []
    for t in tensors:
        assert t.is_contiguous() and t.dim() >= 1, "the audit expects contiguous tensors [P, ...]"
        row = t.stride(0) * t.element_size()
        ranges.append((t.data_ptr() + p * row, t.data_ptr() + (p + 1) * row))
    return ranges


@contextmanager
def bounds_audit() -> Iterator[Report]:
    """Check every interpreted access made inside the ``with`` block; yields the running :class:`Report`."""
    builder = interpreter.interpreter_builder
    report = Report()
    launches: list[list[torch.Tensor]] = []
    call = interpreter.GridExecutor.__call__
    load, store = builder.create_masked_load, builder.create_masked_store

    def audited_call(self, *args, **kwargs):
        launches.append([a for a in args if isinstance(a, torch.Tensor)])
        try:
            return call(self, *args, **kwargs)
        finally:
            launches.pop()

    def check(kind, ptrs, mask):
        p = int(builder.grid_idx[0])
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in _slices(launches[-1], p):
            inside |= (addresses >= start) & (addresses + size <= end)
        report.lanes += addresses.size
        if not inside.all() and not any(v[0] == kind for v in report.violations):
            report.violations.append((kind, p, int(addresses[~inside][0])))

    def audited_load(ptrs, mask, *rest):
        check("load", ptrs, mask)
        return load(ptrs, mask, *rest)

    def audited_store(ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return store(ptrs, value, mask, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.GridExecutor, "__call__", audited_call)
        patch.setattr(builder, "create_masked_load", audited_load)
        patch.setattr(builder, "create_masked_store", audited_store)
        yield report


@triton.jit
def reads_past_its_row(X, Y, K, BLOCK: tl.constexpr):
    """``Y[p] = X[p, K - 1]`` through a BLOCK-wide unmasked load: lanes 1.. read past row ``p``."""
    p = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    tl.store(Y + p + lane, tl.load(X + p * K + K - 1 + lane), mask=lane == 0)
