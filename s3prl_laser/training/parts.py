"""The model being tuned and what trains it: upstream + projection head, the LASER loss, AdamW, schedule.

:func:`build_model` loads the base upstream, freezes it by module name (top ``trainable_layers`` layers and,
by default, the encoder's final layer norm stay trainable), adds a freshly seeded projection head, wraps the
pair in DDP under torchrun, and builds the loss, optimizer and warm-up/decay schedule: one :class:`Parts`.
:func:`export_upstream` writes the tuned upstream back in s3prl's own checkpoint format.

Example::

    >>> parts = build_model(cfg, env)  # doctest: +SKIP
    >>> z, frames = parts.module(wavs, lengths)  # z [B, F, proj_dim], frames [B]  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from s3prl_laser.objective.loss import LaserLoss, ProjectionHead
from s3prl_laser.training.config import FRAME_COUNTS, LaserConfig
from s3prl_laser.training.ranks import DistEnv

logger = logging.getLogger("s3prl_laser.finetune")


class LaserModel(nn.Module):
    """The upstream plus the projection head: ``wavs [B, T], lengths [B] -> (z [B, F, D], frames [B])``.

    ``fp32_head``: the head runs in fp32 even under autocast (its input cast up), as in the official code.
    ``frame_count``: ``"cnn"`` counts each clip's frames with the CNN's formula (the frames it computed
    from the clip alone); ``"round"`` uses ``round(L / downsample_rate)`` like the official code, at most
    the ``F`` frames the batch has (so a clip shorter than the batch may count a frame that saw padding).
    """

    def __init__(
        self, base: nn.Module, head: ProjectionHead, fp32_head: bool = False, frame_count: str = "cnn"
    ) -> None:
        super().__init__()
        if frame_count not in FRAME_COUNTS:
            raise ValueError(f"frame_count must be one of {FRAME_COUNTS}, got {frame_count!r}")
        self.base, self.head = base, head
        self.fp32_head, self.frame_count = fp32_head, frame_count

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, frames = self.base(wavs, lengths)
        if self.frame_count == "round":
            rounded = torch.round(lengths.to(hidden.device).double() / self.base.downsample_rate).long()
            frames = rounded.clamp(1, hidden.shape[1])
        if self.fp32_head:
            with torch.autocast(hidden.device.type, enabled=False):
                return self.head(hidden.float()), frames
        return self.head(hidden), frames


@dataclass
class Parts:
    """Everything a step needs; ``module`` is ``model`` or its DDP wrapper."""

    base: nn.Module
    head: ProjectionHead
    model: LaserModel
    module: nn.Module
    loss_fn: LaserLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_upstream(cfg: LaserConfig) -> tuple[nn.Module, ProjectionHead, int]:
    """The upstream frozen by name, a freshly seeded projection head, and the upstream's trainable count."""
    from s3prl_laser.models.upstream import load_base_model

    base = load_base_model(cfg.upstream, cfg.ckpt)
    n_base = base.freeze(cfg.trainable_layers, train_final_layer_norm=cfg.train_final_layer_norm)
    return base, seeded_head(cfg, base.hidden_size), n_base


def seeded_head(cfg: LaserConfig, hidden_size: int) -> ProjectionHead:
    """The projection head as initialised from ``cfg.seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ProjectionHead(hidden_size, cfg.proj_dim)


def no_buffer_sync() -> dict:
    """DDP's keyword that stops syncing buffers at every forward (newer torch renamed it; every rank builds
    the same buffers from the same checkpoint, so the one sync at start that the new name keeps is moot)."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return {key: False}


def build_model(cfg: LaserConfig, env: DistEnv) -> Parts:
    """Load and freeze the upstream; add the head, loss, AdamW and schedule (DDP-wrapped if distributed)."""
    base, head, n_base = build_upstream(cfg)
    model = LaserModel(base, head, cfg.fp32_head, cfg.frame_count).to(env.device)
    model.train()
    n_head = sum(p.numel() for p in head.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    norm = " + final layer norm" if cfg.train_final_layer_norm else ""
    logger.info(
        "trainable parameters: %s (upstream top %d layers%s: %s, head: %s) of %s",
        f"{n_base + n_head:,}", cfg.trainable_layers, norm, f"{n_base:,}", f"{n_head:,}", f"{n_total:,}",
    )  # fmt: skip
    torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ between ranks, like their data
    module = model
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync())
    loss_fn = LaserLoss(
        cfg.gamma, cfg.alpha, cfg.sigma, cfg.margin, cfg.loss_type, cfg.bandwidth, cfg.softdtw_backend
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = WarmupDecay(cfg.warmup_steps, cfg.steps, cfg.warmup_from_zero)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Parts(base, head, model, module, loss_fn, optimizer, scheduler)


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int, from_zero: bool = False) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup`` up to 1, then linear to ~0.

    ``from_zero``: ``step/warmup`` during the warm-up instead, so the first step has learning rate 0 (the
    official code's schedule, transformers' ``get_linear_schedule_with_warmup``).
    """
    if step < warmup_steps:
        return (step + (0 if from_zero else 1)) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass
class WarmupDecay:
    """The LR multiplier of optimizer step ``step`` (0-based): :func:`linear_warmup_decay`, until
    :meth:`retarget` changes the targets during a run; from then on a line from the multiplier the old
    targets gave at that step (``start_factor`` at ``start_step``) to the new targets: up to 1 at the end
    of the warm-up if it is not over, else down to 0 at ``total_steps``. So a resumed run that changes
    ``steps`` or ``warmup_steps`` goes on from its current lr, without a jump; a finished run (lr 0)
    extended starts anew: a decay from the peak, or a warm-up from 0 when it ends after the current step.

    Its fields are plain numbers: ``LambdaLR.state_dict()`` saves them and ``load_state_dict`` restores them.

    Example::

        >>> schedule = WarmupDecay(warmup_steps=2, total_steps=4)
        >>> [schedule(step) for step in range(4)]
        [0.5, 1.0, 1.0, 0.5]
        >>> schedule.retarget(4, warmup_steps=2, total_steps=8)  # a finished run extended: a new decay
        >>> [schedule(step) for step in range(4, 8)]
        [1.0, 0.75, 0.5, 0.25]
    """

    warmup_steps: int
    total_steps: int
    from_zero: bool = False
    start_step: int = 0
    start_factor: float | None = None  # None: the plain schedule from step 0

    def __call__(self, step: int) -> float:
        warmup, total, start, factor = self.warmup_steps, self.total_steps, self.start_step, self.start_factor
        if factor is None or (start < warmup <= step):  # plain, or the decay after a re-targeted warm-up
            return linear_warmup_decay(step, warmup, total, self.from_zero)
        if step < warmup:  # warming up from `factor` at `start` to 1 at `warmup`
            return factor + (1.0 - factor) * (step - start) / (warmup - start)
        return max(0.0, factor * (total - step) / max(1, total - start))

    def retarget(self, step: int, warmup_steps: int, total_steps: int, from_zero: bool = False) -> None:
        """New targets from optimizer step ``step`` on (nothing changes if they are the same).

        A schedule that is not over goes on from its current multiplier, without a jump: the plain schedule
        of the new targets is kept when it gives that multiplier at ``step`` (e.g. ``steps`` extended during
        the warm-up); otherwise a line starts there. A schedule that is over (``step`` at or past its
        ``total_steps``, multiplier 0) and is extended starts anew at ``step``: a warm-up from 0 to 1 at
        ``warmup_steps`` if that is after ``step``, else a decay from 1 (the peak lr) to 0 at ``total_steps``.
        """
        if (warmup_steps, total_steps, from_zero) == (self.warmup_steps, self.total_steps, self.from_zero):
            return
        current = self(step)
        if self.restarts(step, total_steps) and warmup_steps <= step:
            current = 1.0  # an extended finished run: a new decay from the peak
        plain = linear_warmup_decay(step, warmup_steps, total_steps, from_zero)
        self.warmup_steps, self.total_steps, self.from_zero = warmup_steps, total_steps, from_zero
        if self.start_factor is None and math.isclose(plain, current, rel_tol=1e-12, abs_tol=1e-15):
            return
        self.start_step, self.start_factor = step, current

    def restarts(self, step: int, total_steps: int) -> bool:
        """Whether :meth:`retarget` to ``total_steps`` at ``step`` starts anew (this schedule is over)."""
        return self.total_steps <= step < total_steps

    def describe(self, step: int, lr: float) -> str:
        """The schedule from optimizer step ``step`` on, in words (steps counted from 1, as the log does)."""
        first = f"lr {lr * self(step):.3g} at step {step + 1}"
        if step < self.warmup_steps:
            warmup = f"warming up to lr {lr:.3g} (warmup_steps={self.warmup_steps})"
            return f"{first}, {warmup}, then down to 0 at step {self.total_steps}"
        return f"{first}, down to 0 at step {self.total_steps}"

    def peak(self, step: int) -> float:
        """The largest multiplier from step ``step`` on (the schedule is linear between its corners)."""
        return max(self(step), self(max(step, self.warmup_steps)))


def apply_optimizer_config(parts: Parts, cfg: LaserConfig) -> None:
    """Make the optimizer and schedule follow ``cfg`` from the next step on, after their state was loaded
    from a checkpoint (which brings the old ``lr``, ``weight_decay`` and schedule back).

    Sets each param group's ``initial_lr``, ``weight_decay`` and ``lr``, the scheduler's ``base_lrs``, and
    re-targets the :class:`WarmupDecay` schedule (continuous at the next step). With an unchanged ``cfg``
    it changes nothing, so a plain resume stays bit-identical.
    """
    schedule, step = parts.scheduler.lr_lambdas[0], parts.scheduler.last_epoch
    schedule.retarget(step, cfg.warmup_steps, cfg.steps, cfg.warmup_from_zero)
    parts.scheduler.base_lrs = [cfg.lr for _ in parts.optimizer.param_groups]
    for group in parts.optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        group["lr"] = cfg.lr * schedule(step)


def trainable_state(parts: Parts) -> dict[str, torch.Tensor]:
    """The upstream's trainable parameters by name (the frozen rest comes from ``--ckpt``)."""
    return {name: p.detach().cpu() for name, p in parts.base.named_parameters() if p.requires_grad}


def export_upstream(parts: Parts, cfg: LaserConfig, out: Path) -> Path:
    """Write the tuned upstream as ``OUT/<upstream>_laser.pt`` in s3prl's own checkpoint format."""
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint

    return save_s3prl_checkpoint(parts.base.state_for_s3prl(), out / f"{cfg.upstream}_laser.pt")


def export_best(parts: Parts, cfg: LaserConfig, out: Path) -> tuple[Path, int] | None:
    """Write the upstream of the best validation (``checkpoints/best.pt``) as ``<upstream>_laser_best.pt``.

    The frozen weights are the model's own (they never change); the trainable ones come from ``best.pt``.
    Returns the path and the best step, or None when the run kept no best checkpoint, or a damaged one
    (warned and set aside by :func:`~s3prl_laser.training.checkpoints.read_best`).
    """
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint
    from s3prl_laser.training import checkpoints

    best = checkpoints.read_best(out)
    if best is None:
        return None
    state = parts.base.state_for_s3prl(replace=best["model"])
    return save_s3prl_checkpoint(state, out / f"{cfg.upstream}_laser_best.pt"), int(best["step"])
