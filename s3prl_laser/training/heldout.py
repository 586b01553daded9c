"""Held-out diagnostics of a LASER model: which clips, and the metrics measured on them.

One code path serves the validation during training (:mod:`s3prl_laser.training.loop`, every ``eval_every``
steps) and the ``--demo`` before/after report (:mod:`s3prl_laser.training.demo_report`). For each held-out
clip a perturbed view is made as in training (speed, then pitch; no swap), seeded so that every measurement
sees the same pairs. :func:`measure` then averages over the clips:

* the soft-DTW divergence between the two views of the same clip (what LASER minimises), and, as its scale,
  the divergence between the clean view of a clip and the perturbed view of ANOTHER clip; their ratio is
  scale-free (lower: the two views of one utterance are closer, relative to unrelated speech). The ratio
  is given in the projection space and in the upstream's last layer (frames L2-normalised), which is what
  downstream tasks see;
* a collapse guard: the mean distance between frames at least half a clip apart in time. LASER's temporal
  regulariser keeps it up; were it to fall to 0, the frames would have collapsed onto one point (and every
  divergence with them).

Held-out clips (:func:`split_held_out`): ``dev-clean`` when ``--data`` is a LibriSpeech root that has
it, else a seeded small share of the training clips, which training then leaves out.

Example::

    >>> held_out, train_items, where = split_held_out(cfg, items)  # doctest: +SKIP
    >>> pairs = make_pairs(held_out, cfg)  # doctest: +SKIP
    >>> with eval_mode(base, head):  # doctest: +SKIP
    ...     metrics = measure(base, head, pairs, gamma=0.1)
    >>> metrics["divergence_ratio_upstream"], metrics["far_distance_projection"]  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from s3prl_laser.data import AudioItem, PairDataset, find_audio, librispeech_root
from s3prl_laser.objective.perturb import LaserPerturbation
from s3prl_laser.softdtw import soft_dtw_divergence
from s3prl_laser.training.config import LaserConfig

METRICS = {
    "divergence_projection": "divergence, same clip (projection)",
    "divergence_other_projection": "divergence, other clip (projection)",
    "divergence_ratio_projection": "same / other clip (projection)",
    "divergence_ratio_upstream": "same / other clip (upstream last layer)",
    "far_distance_projection": "far-frame distance (projection)",
    "far_distance_upstream": "far-frame distance (upstream last layer)",
}
BEST_METRIC = "divergence_ratio_upstream"  # lower is better: what the exported upstream gives downstream
COLLAPSE_GUARDS = ("far_distance_projection", "far_distance_upstream")
HELD_OUT_SPLIT = "dev-clean"
MIN_CLIPS = 2  # the "other clip" divergence needs a second clip
Pair = tuple[str, torch.Tensor, torch.Tensor]  # (path, clean [T], perturbed [T'])


def split_held_out(
    cfg: LaserConfig, items: list[AudioItem]
) -> tuple[list[AudioItem], list[AudioItem], str]:
    """``(held-out clips, training clips, where the held-out clips come from)``.

    With ``eval_every = 0`` nothing is held out. When ``cfg.data`` is a LibriSpeech root with ``dev-clean``,
    ``eval_clips`` of its clips (a seeded choice) are held out and ``items`` are returned unchanged.
    Otherwise ``min(eval_clips, len(items) // 10)`` of ``items`` (a seeded choice) are held out and removed
    from the training clips; fewer than 2 means no validation (the description says why).
    """
    if cfg.eval_every == 0:
        return [], items, "off (eval_every=0)"
    data = Path(cfg.data)
    root = librispeech_root(data) if data.is_dir() else None
    if root is not None and (root / HELD_OUT_SPLIT).is_dir():
        dev = find_audio(root, [HELD_OUT_SPLIT])
        chosen = seeded_choice(len(dev), cfg.eval_clips, cfg.seed)
        return [dev[i] for i in chosen], items, f"{len(chosen)} clips of {root / HELD_OUT_SPLIT}"
    count = min(cfg.eval_clips, len(items) // 10)
    if count < MIN_CLIPS:
        return [], items, f"off: {len(items)} clips are too few to hold {MIN_CLIPS} out (10 % at most)"
    chosen = set(seeded_choice(len(items), count, cfg.seed))
    held_out = [item for i, item in enumerate(items) if i in chosen]
    kept = [item for i, item in enumerate(items) if i not in chosen]
    return held_out, kept, f"{count} clips held out of {cfg.data} (seed {cfg.seed}; not trained on)"


def seeded_choice(n: int, count: int, seed: int) -> list[int]:
    """``min(count, n)`` distinct indices of ``range(n)``, sorted, determined by ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:count].tolist())


def make_pairs(items: list[AudioItem], cfg: LaserConfig) -> list[Pair]:
    """``(path, clean [T], perturbed [T'])`` of each usable clip: cropped and perturbed as in training.

    The views are seeded by ``cfg.seed`` and the clip's index (epoch 0), never swapped; unreadable or too
    short clips are left out.
    """
    perturb = LaserPerturbation(cfg.speed_factors, cfg.pitch_semitones, cfg.sample_rate)
    dataset = PairDataset(items, perturb, cfg.sample_rate, cfg.max_seconds, cfg.min_samples, 0.0, cfg.seed)
    samples = [dataset[(index, 0, 0)] for index in range(len(items))]
    return [(item.path, s["a"], s["b"]) for item, s in zip(items, samples, strict=True) if s["skip"] is None]


@torch.no_grad()
def embed(
    base: nn.Module, head: nn.Module, wav: torch.Tensor, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip ``[T]`` -> (upstream last layer, L2-normalised, ``[F, C]``; projection ``[F, D]``).

    Both float32 on the head's device; ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the model under
    autocast, as training does.
    """
    device = next(head.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        hidden, frames = base(wav[None].to(device), torch.tensor([wav.shape[-1]], device=device))
        hidden = hidden[0, : int(frames[0])]
        z = head(hidden)
    return F.normalize(hidden.float(), dim=-1), z.float()


def far_frame_distance(z: torch.Tensor) -> float:
    """Mean ``||z_i - z_j||`` over frame pairs at least half the clip apart (``z: [F, D]``)."""
    n = z.shape[0]
    steps = torch.arange(n, device=z.device)
    far = (steps[:, None] - steps[None, :]).abs() >= max(1, n // 2)
    return float(torch.cdist(z, z)[far].mean())


def divergence(x: torch.Tensor, y: torch.Tensor, gamma: float, backend: str = "auto") -> float:
    """Soft-DTW divergence between ``x [N, D]`` and ``y [M, D]`` (autocast off: full precision)."""
    with torch.autocast(x.device.type, enabled=False):
        return float(soft_dtw_divergence(x[None], y[None], gamma=gamma, backend=backend)[0])


def measure(
    base: nn.Module, head: nn.Module, pairs: list[Pair], gamma: float, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """The :data:`METRICS` of ``(base, head)``, averaged over ``pairs`` (at least 2; call in eval mode).

    "Other clip" compares the clean view of clip ``i`` with the perturbed view of clip ``i + 1``: the
    divergence of two unrelated utterances, the scale against which "same clip" is read.
    """
    if len(pairs) < MIN_CLIPS:
        raise ValueError(f"measuring needs at least {MIN_CLIPS} held-out clips, got {len(pairs)}")
    views = [
        (embed(base, head, clean, amp_dtype), embed(base, head, perturbed, amp_dtype))
        for _, clean, perturbed in pairs
    ]
    totals = dict.fromkeys(["upstream", "other_upstream", "projection", "other_projection"], 0.0)
    far = {"upstream": 0.0, "projection": 0.0}
    for i, ((u1, z1), (u2, z2)) in enumerate(views):
        (u_other, z_other) = views[(i + 1) % len(views)][1]
        totals["projection"] += divergence(z1, z2, gamma)
        totals["upstream"] += divergence(u1, u2, gamma)
        totals["other_projection"] += divergence(z1, z_other, gamma)
        totals["other_upstream"] += divergence(u1, u_other, gamma)
        far["projection"] += (far_frame_distance(z1) + far_frame_distance(z2)) / 2
        far["upstream"] += (far_frame_distance(u1) + far_frame_distance(u2)) / 2
    n = len(views)
    return {
        "divergence_projection": totals["projection"] / n,
        "divergence_other_projection": totals["other_projection"] / n,
        "divergence_ratio_projection": totals["projection"] / totals["other_projection"],
        "divergence_ratio_upstream": totals["upstream"] / totals["other_upstream"],
        "far_distance_projection": far["projection"] / n,
        "far_distance_upstream": far["upstream"] / n,
    }


@contextmanager
def eval_mode(*modules: nn.Module):
    """Put ``modules`` in eval mode for the ``with`` block, then restore each one's train/eval mode."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
