"""Independent float64 oracles for the soft-DTW tests: plain O(N*M) Python loops over one pair."""

from __future__ import annotations

import math

import numpy as np


def in_band(i: int, j: int, n: int, m: int, bandwidth: float | None) -> bool:
    """Sakoe-Chiba band around the slope-scaled diagonal, half-width max(bandwidth, 1) longer-side frames."""
    return bandwidth is None or abs(i * m - j * n) <= math.floor(max(bandwidth, 1.0) * max(n, m))


def soft_dtw_loop(cost: np.ndarray, gamma: float, bandwidth: float | None = None) -> float:
    """R[n, m] of the soft-DTW recursion with true infinities, for one cost matrix [n, m]."""
    n, m = cost.shape
    R = np.full((n + 1, m + 1), np.inf)
    R[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if not in_band(i, j, n, m, bandwidth):
                continue
            prev = [R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]]
            low = min(prev)
            if math.isinf(low):
                continue
            total = sum(math.exp(-(p - low) / gamma) for p in prev if not math.isinf(p))
            R[i, j] = cost[i - 1, j - 1] + low - gamma * math.log(total)
    return float(R[n, m])


def sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, m] squared Euclidean distances by broadcasting (small inputs only)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
