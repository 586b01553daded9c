"""The probe's head and its training: SUPERB's softmax layer weights, then a linear CTC head.

``ProbeHead``: features ``[B, L, F, C]`` (every hidden layer) -> each layer normalised (layer norm without
parameters), summed with learnable softmax weights ``w [L]`` -> ``[B, F, C]`` -> a linear layer (or an
MLP with ``hidden > 0``) -> log-probabilities ``[B, F, V]`` over the vocabulary (index 0: CTC blank).

:func:`train_head` runs a fixed step budget of AdamW on seeded random batches of the training clips,
evaluates the CTC loss on a dev slice every ``eval_every`` steps and stops after ``patience`` evaluations
without improvement, keeping the best head. Same seed, same clips -> same numbers.

Example::

    >>> head, info = train_head(train_x, train_y, dev_x, dev_y, 29, HeadSettings())  # doctest: +SKIP
    >>> head.layer_weights()  # [L], sums to 1  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger("s3prl_laser.probe")


@dataclass(frozen=True)
class HeadSettings:
    steps: int = 2000  # step budget
    batch_size: int = 16  # clips per step
    lr: float = 2e-3  # AdamW learning rate
    hidden: int = 0  # 0: linear head; > 0: one hidden layer of this width
    eval_every: int = 100  # dev-slice CTC loss every this many steps
    patience: int = 5  # stop after this many evaluations without a better dev loss
    seed: int = 0


class ProbeHead(nn.Module):
    def __init__(self, layers: int, dim: int, vocab_size: int, hidden: int = 0) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(layers))  # softmax -> uniform at start, as SUPERB
        self.out = (
            nn.Linear(dim, vocab_size)
            if hidden == 0
            else nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, vocab_size))
        )

    def layer_weights(self) -> torch.Tensor:
        """The softmax layer weights ``[L]``."""
        return F.softmax(self.weights.detach(), dim=0)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats [B, L, F, C]`` -> log-probabilities ``[B, F, V]``."""
        normed = F.layer_norm(feats.float(), feats.shape[-1:])
        mixed = torch.einsum("l,blfc->bfc", F.softmax(self.weights, dim=0), normed)
        return F.log_softmax(self.out(mixed), dim=-1)


def pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, F_i, C]`` each -> ``([B, L, F_max, C], frames [B])``."""
    frames = torch.tensor([f.shape[1] for f in feats])
    padded = feats[0].new_zeros(len(feats), feats[0].shape[0], int(frames.max()), feats[0].shape[2])
    for i, f in enumerate(feats):
        padded[i, :, : f.shape[1]] = f
    return padded, frames


def ctc_loss(
    head: ProbeHead, feats: list[torch.Tensor], targets: list[list[int]], device: torch.device
) -> torch.Tensor:
    """Mean CTC loss (per target symbol) of a batch of clips."""
    x, frames = pad_batch(feats)
    log_probs = head(x.to(device)).transpose(0, 1)  # [F, B, V]
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in targets])
    return F.ctc_loss(log_probs, flat, frames, lengths, blank=0, reduction="mean", zero_infinity=True)


@torch.no_grad()
def dev_loss(
    head: ProbeHead,
    feats: list[torch.Tensor],
    targets: list[list[int]],
    batch_size: int,
    device: torch.device,
) -> float:
    losses = [
        float(ctc_loss(head, feats[i : i + batch_size], targets[i : i + batch_size], device))
        * len(feats[i : i + batch_size])
        for i in range(0, len(feats), batch_size)
    ]
    return sum(losses) / len(feats)


def train_head(
    train_x: list[torch.Tensor],
    train_y: list[list[int]],
    dev_x: list[torch.Tensor],
    dev_y: list[list[int]],
    vocab_size: int,
    settings: HeadSettings,
    device: torch.device | None = None,
    desc: str = "head",
) -> tuple[ProbeHead, dict]:
    """Train a head on ``train_x`` (``[L, F, C]`` each) with targets ``train_y``; early stopping on ``dev_x``.

    Returns the head with the best dev-slice loss and ``{"steps", "best_step", "dev_loss"}``.
    """
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = ProbeHead(train_x[0].shape[0], train_x[0].shape[2], vocab_size, settings.hidden).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr)
    best = (float("inf"), 0, copy.deepcopy(head.state_dict()))
    waited, step = 0, 0
    with tqdm(total=settings.steps, desc=desc, unit="step", leave=False, disable=None) as bar:
        for step in range(1, settings.steps + 1):
            pick = torch.randint(
                len(train_x), (min(settings.batch_size, len(train_x)),), generator=generator
            ).tolist()
            loss = ctc_loss(head, [train_x[i] for i in pick], [train_y[i] for i in pick], device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step % settings.eval_every == 0 or step == settings.steps:
                current = dev_loss(head, dev_x, dev_y, settings.batch_size, device)
                bar.set_postfix(dev_loss=f"{current:.3f}")
                if current < best[0]:
                    best, waited = (current, step, copy.deepcopy(head.state_dict())), 0
                else:
                    waited += 1
                    if waited >= settings.patience:
                        break
    head.load_state_dict(best[2])
    return head, {"steps": step, "best_step": best[1], "dev_loss": best[0]}
