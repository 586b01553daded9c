"""Timing and peak-memory helpers shared by the benchmark scripts (imported as a sibling module).

CUDA work is asynchronous: every wall-clock reading here first waits for the device's queue.

- ``sync(device)``: wait for ``device`` (CUDA) and return ``time.perf_counter()``;
- ``timed(fn, device)``: seconds of one call of ``fn``, synchronised on both sides;
- ``median_ms(fn, device, repeats)``: ``triton.testing.do_bench`` (median) on CUDA, else the median of
  ``repeats`` timed calls after one warm-up call;
- ``PeakMemory(device)``: peak memory growth inside a ``with`` block (CUDA allocator statistics, or
  sampled RSS on the CPU); ``exact_cpu_rss()`` makes freed large blocks leave RSS so that the sampled
  RSS follows live tensors.

    >>> with PeakMemory(torch.device("cpu")) as mem:  # doctest: +SKIP
    ...     ms = median_ms(lambda: torch.randn(1000, 1000).sum(), torch.device("cpu"), repeats=3)
    >>> mem.peak  # bytes  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> float:
    """Wait for the queued work of ``device`` (CUDA only), then return ``time.perf_counter()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, with the device synchronised before and after."""
    start = sync(device)
    fn()
    return sync(device) - start


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms: ``do_bench`` on CUDA; else ``repeats`` runs after a warm-up call."""
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats)) * 1e3


class PeakMemory:
    """Peak memory growth of a block, in bytes (``.peak``): CUDA allocator statistics, or sampled RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, base: int) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss() - base)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()


def exact_cpu_rss() -> None:
    """Make glibc mmap (and unmap on free) every block over 1 MiB, so RSS tracks live tensors."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, no dynamic raising
