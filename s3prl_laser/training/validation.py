"""Validation while training: the held-out metrics every ``eval_every`` steps, the best checkpoint, the cost.

Every ``eval_every`` optimizer steps and at the last one, rank 0 measures the model on the held-out pairs
with :func:`s3prl_laser.training.heldout.measure` (the code path of the demo report) while the other ranks
wait. It logs every metric to TensorBoard (``val/<metric>``) and the newest ones to the progress bar
(:attr:`Validator.latest`), warns once when a collapse guard (far-frame distance) falls below
``collapse_threshold``, and keeps ``OUT/checkpoints/best.pt``: the trainable weights at the lowest
:data:`~s3prl_laser.training.heldout.BEST_METRIC` so far among the validations whose collapse guards stayed
above the threshold. Each validation's time is logged with its share of the
training time since the previous one (``val/seconds``, ``val/share_of_training``).

Example::

    >>> validator = Validator(cfg, held_out, "4 clips of dev-clean", env)  # doctest: +SKIP
    >>> if validator.due(state.step, done):  # doctest: +SKIP
    ...     validator.run(parts, state, out, writer)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from s3prl_laser.data import AudioItem
from s3prl_laser.training import checkpoints
from s3prl_laser.training.config import LaserConfig, to_dict
from s3prl_laser.training.heldout import (
    BEST_METRIC,
    COLLAPSE_GUARDS,
    METRICS,
    MIN_CLIPS,
    eval_mode,
    make_pairs,
    measure,
)
from s3prl_laser.training.parts import Parts, trainable_state
from s3prl_laser.training.ranks import DistEnv, run_together

logger = logging.getLogger("s3prl_laser.finetune")


class Validator:
    """The held-out pairs (built on rank 0) and what one validation does with them.

    ``held_out`` must be the same list on every rank (it decides when all ranks meet after a validation).
    """

    def __init__(self, cfg: LaserConfig, held_out: list[AudioItem], where: str, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.enabled = len(held_out) >= MIN_CLIPS
        self.pairs = make_pairs(held_out, cfg) if self.enabled and env.is_main else []
        if env.is_main:
            usable = f"; {len(self.pairs)} usable" if len(self.pairs) != len(held_out) else ""
            logger.info("validation: %s%s", where, usable)
            if self.enabled and len(self.pairs) < MIN_CLIPS:
                logger.warning("validation off: fewer than %d held-out clips could be read", MIN_CLIPS)
        use_bf16 = env.device.type == "cuda" and cfg.precision == "bf16"
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        self.latest: dict[str, float] = {}
        self.mark = time.perf_counter()

    def due(self, step: int, done: bool) -> bool:
        """Whether step ``step`` (just taken) is validated: every ``eval_every`` steps and the last one."""
        return self.enabled and self.cfg.eval_every > 0 and (step % self.cfg.eval_every == 0 or done)

    def run(self, parts: Parts, state, out: Path, writer) -> dict[str, float] | None:
        """Measure on rank 0, log, keep the best checkpoint; every rank returns once rank 0 is done (a failure
        on rank 0 reaches them at once: :func:`~s3prl_laser.training.ranks.run_together`).

        ``state`` is the loop's ``TrainState`` (``step``, ``best_step``, ``best_value``,
        ``collapse_warned`` are read and updated). Returns the metrics on rank 0, else None.
        """

        def validate() -> dict[str, float] | None:
            if not (self.env.is_main and len(self.pairs) >= MIN_CLIPS):
                return None
            trained = time.perf_counter() - self.mark
            started = time.perf_counter()
            with eval_mode(parts.base, parts.head):
                metrics = measure(parts.base, parts.head, self.pairs, self.cfg.gamma, self.amp_dtype)
            seconds = time.perf_counter() - started
            self._report(metrics, state, writer, seconds, trained)
            self._keep_best(metrics, parts, state, out)
            return metrics

        metrics = run_together(self.env, f"validating step {state.step}", validate)
        self.mark = time.perf_counter()
        return metrics

    def _report(self, metrics, state, writer, seconds: float, trained: float) -> None:
        share = seconds / max(trained, 1e-9)
        if writer is not None:
            for key in METRICS:
                writer.add_scalar(f"val/{key}", metrics[key], state.step)
            writer.add_scalar("val/seconds", seconds, state.step)
            writer.add_scalar("val/share_of_training", share, state.step)
        far = min(metrics[key] for key in COLLAPSE_GUARDS)
        self.latest = {"val": f"{metrics[BEST_METRIC]:.4f}", "far": f"{far:.3f}"}
        logger.info(
            "validation at step %d: %s %.4f, far-frame distance %.3f (projection) %.3f (upstream); "
            "%.1f s, %.1f %% of the %.0f s of training since the previous one",
            state.step, BEST_METRIC, metrics[BEST_METRIC], metrics["far_distance_projection"],
            metrics["far_distance_upstream"], seconds, 100 * share, trained,
        )  # fmt: skip
        low = [key for key in COLLAPSE_GUARDS if metrics[key] < self.cfg.collapse_threshold]
        if low and not state.collapse_warned:
            state.collapse_warned = True
            logger.warning(
                "collapse guard: %s fell below collapse_threshold=%s at step %d (%s): the frames are "
                "collapsing onto one point; check alpha/margin and loss_type (warned once)",
                ", ".join(low), self.cfg.collapse_threshold, state.step,
                ", ".join(f"{metrics[key]:.3f}" for key in low),
            )  # fmt: skip

    def _keep_best(self, metrics, parts: Parts, state, out: Path) -> None:
        guarded = all(metrics[key] >= self.cfg.collapse_threshold for key in COLLAPSE_GUARDS)
        if not guarded or (state.best_value is not None and metrics[BEST_METRIC] >= state.best_value):
            return
        state.best_step, state.best_value = state.step, metrics[BEST_METRIC]
        best = {
            "model": trainable_state(parts),
            "head": {k: v.cpu() for k, v in parts.head.state_dict().items()},
            "step": state.step,
            "metrics": metrics,
            "config": to_dict(self.cfg),
        }
        path = checkpoints.save_best(best, out)
        logger.info("best so far (%s %.4f at step %d): %s", BEST_METRIC, state.best_value, state.step, path)
