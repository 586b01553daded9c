"""Greedy CTC decoding and error rates by edit distance.

Example::

    >>> greedy_decode(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]).log())
    [1]
    >>> error_rate([[1, 2, 3]], [[1, 3]])
    0.3333333333333333
"""

from __future__ import annotations

import editdistance
import torch

from s3prl_laser.probe.features import release
from s3prl_laser.probe.head import ProbeHead


def greedy_decode(log_probs: torch.Tensor) -> list[int]:
    """Best symbol per frame ``[F, V]``, repeats merged, blanks (0) dropped."""
    best = log_probs.argmax(dim=-1).tolist()
    return [s for i, s in enumerate(best) if s != 0 and (i == 0 or s != best[i - 1])]


def edit_counts(references: list[list[int]], hypotheses: list[list[int]]) -> list[int]:
    """Edit distance (substitutions, deletions, insertions) of each hypothesis from its reference."""
    return [editdistance.eval(r, h) for r, h in zip(references, hypotheses, strict=True)]


def error_rate(references: list[list[int]], hypotheses: list[list[int]]) -> float:
    """Total edit distance over total reference length (CER for characters, PER for phones): pooled over
    the corpus, so a long utterance weighs more than a short one (not the mean of per-utterance rates)."""
    return sum(edit_counts(references, hypotheses)) / max(1, sum(len(r) for r in references))


@torch.no_grad()
def decode_all(
    head: ProbeHead, feats: list[torch.Tensor], batch_size: int, device: torch.device
) -> list[list[int]]:
    """Greedy hypotheses of each clip ``[L, F, C]``."""
    head.eval()
    hypotheses = []
    for i in range(0, len(feats), batch_size):
        log_probs, frames = head([feats[j] for j in range(i, min(i + batch_size, len(feats)))])
        log_probs = log_probs.cpu()
        release(feats)
        hypotheses += [greedy_decode(lp[:n]) for lp, n in zip(log_probs, frames.tolist(), strict=True)]
    return hypotheses
