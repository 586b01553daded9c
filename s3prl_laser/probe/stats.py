"""How sure the probe is: a paired bootstrap over evaluation utterances.

Two upstreams are scored on the same utterances, so their difference is measured pairwise: resample the
utterances with replacement (the same draw for both), compute each corpus error rate as the pooled edits
over the pooled reference length of the draw, and take the relative difference ``(b - a) / a``. The 2.5th
and 97.5th percentiles of ``samples`` draws give a 95 % interval; when it holds 0 the difference is within
the noise of this set of utterances (other utterances could have reversed it).

Example::

    >>> paired_bootstrap([3, 1, 4, 2], [3, 1, 4, 2], [10, 5, 12, 8])
    (0.0, 0.0)
"""

from __future__ import annotations

import numpy as np

SAMPLES = 2000


def pooled_rate(edits: list[int], lengths: list[int]) -> float:
    """Total edits over total reference length (not the mean of per-utterance rates)."""
    return sum(edits) / max(1, sum(lengths))


def paired_bootstrap(
    edits_a: list[int], edits_b: list[int], lengths: list[int], samples: int = SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of the relative difference of pooled error rates, ``(rate_b - rate_a) / rate_a``.

    The reference lengths cancel within a draw (both upstreams share them), so the relative difference of
    a draw is ``(sum edits_b - sum edits_a) / sum edits_a`` over the drawn utterances; draws where ``a``
    made no error at all are left out (their relative difference is undefined).
    """
    a, b = np.asarray(edits_a, dtype=np.int64), np.asarray(edits_b, dtype=np.int64)
    if not len(a) == len(b) == len(lengths) or len(a) == 0:
        raise ValueError(f"paired scores of {len(a)}, {len(b)} and {len(lengths)} utterances")
    draws = np.random.default_rng(seed).integers(0, len(a), size=(samples, len(a)))
    total_a, total_b = a[draws].sum(axis=1), b[draws].sum(axis=1)
    keep = total_a > 0
    if not keep.any():
        return (0.0, 0.0) if not b.any() else (float("inf"), float("inf"))
    relative = (total_b[keep] - total_a[keep]) / total_a[keep]
    low, high = np.percentile(relative, [2.5, 97.5])
    return float(low), float(high)


def holds_zero(interval: tuple[float, float]) -> bool:
    return interval[0] <= 0.0 <= interval[1]
