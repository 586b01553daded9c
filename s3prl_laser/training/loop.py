"""The training loop of a LASER run: steps, progress and TensorBoard, checkpoints and resume.

One step: ``grad_accum_steps`` batches (default 1) of ``batch_size`` (view, view) pairs from
``s3prl_laser.data``, each run as one or more micro-batches (as many as the audio budget ``max_batch_seconds``
needs; it never changes which pairs make a step); for each micro-batch, both views through the model in one
``[2b, T]`` batch -> ``LaserLoss`` between rows ``[:b]`` and ``[b:]`` -> backward, gradients accumulated; then
(when every rank's losses are finite) the gradient of the mean loss over all the step's pairs, clipping, AdamW
step. Ranks agree on skips and stop requests through one small all-reduce per step (a stop signal that comes
before a step's last micro-batch drops that step, unfinished, on every rank; one during the last micro-batch
is agreed before the update, which counts), and every ``eval_every`` steps
:mod:`s3prl_laser.training.validation` validates. Training checkpoints (every ``save_every`` steps, at the end
and on a stop signal) hold everything a bit-identical resume needs: trainable weights, head, optimizer,
schedule, every rank's RNG, data position.

Example::

    >>> state = TrainState()  # doctest: +SKIP
    >>> train(cfg, parts, items, state, out, env, stop)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.adam import Adam  # the classes themselves: tests may patch torch.optim.AdamW
from torch.optim.adamw import AdamW

from s3prl_laser.data import (
    AudioItem,
    BucketBatchSampler,
    PairBatch,
    PairDataset,
    build_loader,
    clip_limit_samples,
    complete_pairs,
    default_workers,
    stop_workers,
    view_stretch,
)
from s3prl_laser.errors import DamagedCheckpointError, UserInputError
from s3prl_laser.objective.loss import LaserLoss, LaserLossOutput
from s3prl_laser.objective.perturb import LaserPerturbation
from s3prl_laser.training import checkpoints
from s3prl_laser.training.config import LaserConfig, from_dict, refused_changes, to_dict
from s3prl_laser.training.parts import Parts, apply_optimizer_config, trainable_state
from s3prl_laser.training.ranks import (
    DistEnv,
    PeerFailure,
    StopSignals,
    agree,
    agreed_stop,
    average_gradients,
    flat_gradients,
    ignore_signals_in_worker,
    run_together,
    stop_flags,
)
from s3prl_laser.training.validation import Validator

logger = logging.getLogger("s3prl_laser.finetune")

SKIP_REASONS = ("unreadable", "too_short", "nonfinite", "empty", "oom")


def build_data(
    cfg: LaserConfig, items: list[AudioItem], env: DistEnv, start: tuple[int, int]
) -> tuple[torch.utils.data.DataLoader, BucketBatchSampler]:
    """DataLoader of pair micro-batches for this rank, starting at sampler position ``start``.

    Batches hold ``batch_size`` pairs; the audio budget ``max_batch_seconds`` cuts each into micro-batches
    that fit it (``PairBatch.part``); clips longer than one pair's share of the budget are cropped to it
    (counted in ``PairBatch.cropped``).
    """
    perturb = LaserPerturbation(cfg.speed_factors, cfg.pitch_semitones, cfg.sample_rate)
    budget_limit = clip_limit_samples(None, cfg.max_batch_seconds, cfg.speed_factors, cfg.sample_rate)
    dataset = PairDataset(
        items, perturb, cfg.sample_rate, cfg.max_seconds, cfg.min_samples, cfg.swap_prob, cfg.seed,
        budget_limit=budget_limit, perturb_in_worker=cfg.perturb_on == "workers",
    )  # fmt: skip
    budget = None if cfg.max_batch_seconds is None else int(cfg.max_batch_seconds * cfg.sample_rate)
    sampler = BucketBatchSampler(
        [item.num_samples for item in items],
        cfg.batch_size,
        cfg.bucket_batches,
        cfg.seed,
        env.rank,
        env.world_size,
        start,
        max_batch_samples=budget,
        view_stretch=view_stretch(cfg.speed_factors),
        clip_limit=clip_limit_samples(cfg.max_seconds, None, cfg.speed_factors, cfg.sample_rate),
        budget_limit=budget_limit,
    )
    if cfg.max_batch_seconds is not None:
        batches = sampler.epoch_batches(start[0])
        parts = sum(len(sampler.micro_batches(batch)) for batch in batches) / len(batches)
        binding = cfg.max_seconds is None or budget_limit < cfg.max_seconds * cfg.sample_rate
        cropped = sum(item.num_samples > budget_limit for item in items) if binding else 0
        logger.info(
            "batch budget %g s: a step of %d pairs (batch_size %d x grad_accum_steps %d) runs as %.2f "
            "micro-batches on average in epoch %d; %d clips longer than %.1f s are cropped to it",
            cfg.max_batch_seconds, cfg.batch_size * cfg.grad_accum_steps, cfg.batch_size,
            cfg.grad_accum_steps, parts * cfg.grad_accum_steps, start[0], cropped,
            budget_limit / cfg.sample_rate,
        )  # fmt: skip
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    loader = build_loader(
        dataset,
        sampler,
        workers,
        cfg.seed,
        worker_init_fn=ignore_signals_in_worker,
        pin_memory=env.device.type == "cuda",
        prefetch_factor=cfg.prefetch_batches,
    )
    return loader, sampler


# ----------------------------------------------------------------------------------------------------------
# one step


@dataclass
class TrainState:
    """Progress: optimizer steps done, sampler position of the next batch, counts of skipped things, the
    validation's bookkeeping (best step and value so far, whether the collapse warning was given), and the
    signal the run stopped for (agreed by all ranks; None while it runs or when it finished)."""

    step: int = 0
    position: tuple[int, int] = (0, 0)
    counters: Counter = field(default_factory=Counter)
    pairs: int = 0
    best_step: int | None = None
    best_value: float | None = None
    collapse_warned: bool = False
    stop_signal: int | None = None


def forward_pairs(module: nn.Module, batch: PairBatch, env: DistEnv, cfg: LaserConfig):
    """Both views through the model in one ``[2B, T]`` batch; bf16 autocast on CUDA if configured."""
    wavs = batch.wavs.to(env.device, non_blocking=True)
    lengths = batch.lengths.to(env.device, non_blocking=True)
    use_bf16 = env.device.type == "cuda" and cfg.precision == "bf16"
    with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return module(wavs, lengths)


def pair_loss(loss_fn: LaserLoss, z: torch.Tensor, frames: torch.Tensor, num_pairs: int) -> LaserLossOutput:
    """LaserLoss between rows ``[:B]`` and ``[B:]`` (soft-DTW and regulariser in float32)."""
    z = z.float()
    return loss_fn(z[:num_pairs], z[num_pairs:], frames[:num_pairs], frames[num_pairs:])


def local_step(
    parts: Parts, batch: PairBatch, cfg: LaserConfig, env: DistEnv, perturb: LaserPerturbation | None
) -> list[float] | None:
    """This rank's share of a step: (on-device perturbation,) forward, loss and, if finite, backward.

    The backward pass is of the batch's loss SUM over its pairs (``loss * B``), added to the gradients
    already there (gradient accumulation); :func:`train_step` divides by the step's pair count. Gradients
    stay local (DDP's ``no_sync``): ranks average them only once all agree that the step counts.

    Returns the micro-batch's sums ``[pairs, loss * pairs, alignment, regularizer]`` on the host, read in
    ONE device sync (the sums and the finite flag stacked, one ``.tolist()``); None when the loss is not
    finite: then no backward runs and the graph (every activation) is released on return.
    """
    batch = complete_pairs(batch, perturb, env.device)
    sync_off = parts.module.no_sync() if env.distributed else contextlib.nullcontext()
    with sync_off:
        z, frames = forward_pairs(parts.module, batch, env, cfg)
        out = pair_loss(parts.loss_fn, z, frames, batch.num_pairs)
        total = out.loss * batch.num_pairs
        finite = torch.isfinite(total).float()
        sums = torch.stack([total.detach().float(), out.alignment.detach().float().sum(),
                            out.regularizer.detach().float().sum(), finite])  # fmt: skip
        loss_sum, alignment, regularizer, finite = sums.tolist()
        if not finite:
            return None
        total.backward()
    return [float(batch.num_pairs), loss_sum, alignment, regularizer]


def scale_gradients(params: list[nn.Parameter], factor: float) -> None:
    """Multiply every gradient by ``factor`` in place."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def release_memory(parts: Parts, env: DistEnv) -> None:
    """After an out-of-memory error: drop the partial gradients and hand cached blocks back to the device."""
    parts.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_update(parts: Parts, env: DistEnv) -> torch.Tensor | None:
    """Allocate, before the ranks agree that the step counts, what the update needs beyond the gradients:
    AdamW's state on the first step (:func:`init_optimizer_state`) and, under DDP, the flat copy of the
    gradients that one all-reduce averages (returned; None on one process). An out-of-memory error here is
    thus the step's agreed skip on every rank, never one rank failing after the others went on."""
    init_optimizer_state(parts.optimizer)
    return flat_gradients(parts.trainable()) if env.distributed else None


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam(W)'s per-parameter state (step 0, zero moments) where it does not exist yet, exactly as
    its first ``step`` would (which then finds it and allocates nothing); other optimizers are left as is."""
    if not isinstance(optimizer, Adam | AdamW):
        return
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable"):
            return  # their step tensors live on the device: leave those to torch
        for p in group["params"]:
            state = optimizer.state[p]
            if p.requires_grad and not state:
                state["step"] = torch.tensor(0.0, dtype=step_dtype)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass
class LocalStep:
    """What this rank's micro-batches of a step gave, before the ranks agree on it.

    ``sums``: pairs, loss * pairs, alignment, regularizer over the micro-batches run (zero when the step is
    not usable); ``ran``: how many ran; ``oom``: the batch that ran out of memory; ``error``: an exception
    of this rank (a bug, a device fault) to raise once the others know; ``nonfinite``: a loss was not
    finite; ``flat``: under DDP, the flat gradient buffer the update averages (:func:`prepare_update`);
    ``cut``: a stop signal came before all micro-batches ran (the step is dropped, unfinished).
    """

    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    ran: int = 0
    oom: PairBatch | None = None
    error: Exception | None = None
    nonfinite: bool = False
    flat: torch.Tensor | None = None
    cut: bool = False

    @property
    def outcomes(self) -> dict[str, bool]:
        """What this rank reports in the step's agreement; any of them on any rank skips the step."""
        return {
            "failed": self.error is not None,
            "empty": not (self.ran or self.oom is not None or self.error or self.nonfinite or self.cut),
            "nonfinite": self.nonfinite,
            "oom": self.oom is not None,
            "cut": self.cut,
        }


@dataclass
class AgreedStep:
    """What every rank of a step agreed on: why the step is skipped (None: it counts), the signal the run
    stops for (None: none), the step's sums over all ranks (pairs, loss * pairs, alignment, regularizer),
    and whether a rank cut it short for that signal (then every rank drops it: no update, no data passed).
    """

    skip: str | None
    stop: int | None
    sums: list[float]
    cut: bool = False


SKIPS = ("oom", "nonfinite", "empty")  # the reported skip when several apply: the first one


def run_micro_batches(
    parts: Parts,
    batches: list[PairBatch],
    cfg: LaserConfig,
    env: DistEnv,
    perturb: LaserPerturbation | None,
    stop: StopSignals | None = None,
) -> LocalStep:
    """This rank's part of a step: :func:`local_step` on each of ``batches`` (gradients accumulated), then
    :func:`prepare_update`. Runs no collective. It stops at the first micro-batch that runs out of memory
    (then frees what the step allocated), whose loss is not finite (its graph is released), or that fails
    otherwise under DDP (kept in ``error``; on one process it is raised at once); and before any micro-batch
    once ``stop`` has received a signal (``cut``: the step is then dropped by every rank, so a signal costs at
    most the micro-batch in progress, not the rest of the step and one more)."""
    local = LocalStep()
    for batch in batches:
        if batch.num_pairs == 0:
            continue
        if stop is not None and stop.signum is not None:
            local.cut = True
            break
        try:
            stats = local_step(parts, batch, cfg, env, perturb)
        except torch.OutOfMemoryError:
            local.oom = batch
            break
        except Exception as exc:  # a bug or a device fault on this rank: tell the others before raising it
            if not env.distributed:
                raise
            local.error = exc
            break
        if stats is None:  # the step is skipped: its remaining micro-batches would be wasted work
            local.nonfinite = True
            break
        local.sums, local.ran = [a + v for a, v in zip(local.sums, stats, strict=True)], local.ran + 1
    if local.ran and not any(local.outcomes.values()):
        try:
            local.flat = prepare_update(parts, env)
        except torch.OutOfMemoryError:
            local.oom = batches[-1]
    if local.oom is not None:  # outside the except block: the traceback frames (and their tensors) are gone
        local.flat = None
        release_memory(parts, env)
        oom = local.oom
        logger.warning(
            "out of memory in the step on batch %s (micro-batch %d of %d: %d pairs, %d samples per row): "
            "skipping the step; lower max_batch_seconds if this recurs", oom.position, oom.part[0] + 1,
            oom.part[1], oom.num_pairs, oom.wavs.shape[-1],
        )  # fmt: skip
    if local.nonfinite or local.oom is not None or local.cut:
        local.sums = [0.0, 0.0, 0.0, 0.0]  # only a usable step's sums count
    return local


def agree_on_step(env: DistEnv, local: LocalStep, stop: StopSignals | None) -> AgreedStep:
    """One small all-reduce of every rank's outcomes, stop request (``stop`` read now: a signal that came
    during this rank's micro-batches counts for this step) and sums. A rank whose micro-batches failed raises
    its own exception; the others raise :class:`~s3prl_laser.training.ranks.PeerFailure`."""
    outcomes = local.outcomes
    flags = [float(v) for v in outcomes.values()]
    stops = stop_flags(stop.signum if stop is not None else None)
    agreed = agree(env, flags + stops + local.sums)
    counts = dict(zip(outcomes, agreed[: len(flags)], strict=True))
    if counts["failed"]:
        if local.error is not None:
            raise local.error
        failed = int(counts["failed"])
        raise PeerFailure(f"{failed} other process(es) failed in this step; see their traceback")
    skip = next((reason for reason in SKIPS if counts[reason]), None)
    signal = agreed_stop(agreed[len(flags) : len(flags) + len(stops)])
    return AgreedStep(skip, signal, agreed[len(flags) + len(stops) :], cut=bool(counts["cut"]))


def apply_update(parts: Parts, cfg: LaserConfig, env: DistEnv, flat: torch.Tensor | None, sums: list[float]):
    """The agreed update: the gradient of the mean loss over the step's pairs (every rank's: one all-reduce
    of ``flat`` under DDP), clipping, the optimizer and schedule step. Returns the gradient norm, or None
    when it is not finite (then nothing is updated)."""
    pairs = sums[0]
    if flat is None:
        scale_gradients(parts.trainable(), 1.0 / pairs)  # sum over the step's pairs -> their mean
    else:
        average_gradients(env, parts.trainable(), flat, pairs)
    norm = nn.utils.clip_grad_norm_(parts.trainable(), cfg.grad_clip)
    if not torch.isfinite(norm):
        parts.optimizer.zero_grad(set_to_none=True)
        return None
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train_step(
    parts: Parts,
    batches: list[PairBatch],
    cfg: LaserConfig,
    env: DistEnv,
    stop: StopSignals | None = None,
    perturb: LaserPerturbation | None = None,
) -> dict:
    """One optimizer step: this rank's micro-batches (:func:`run_micro_batches`: the micro-batches of the
    step's ``grad_accum_steps`` batches, their gradients accumulated; ranks may run different numbers of them,
    as the budget cuts their batches differently), the ranks' agreement (:func:`agree_on_step`), then, when
    every rank's step is usable, the update (:func:`apply_update`).

    A rank that runs out of memory (in a forward, a backward, or allocating the update's buffers: see
    :func:`prepare_update`), or whose loss is not finite, makes every rank skip the step, so the run goes on
    with the next batch. A rank whose micro-batches fail otherwise (a bug, a device fault) reports it in the
    agreement and then re-raises its exception with its traceback, while the others raise
    :class:`~s3prl_laser.training.ranks.PeerFailure`: the micro-batches run no collective, so every rank gets
    there. ``stop`` holds the signal this process received (if any), read before each micro-batch and at
    the agreement: a signal that comes during the step's last micro-batch is agreed before its update (the
    step counts and is saved); one that comes earlier drops the step on every rank (``dropped``: no update,
    its data not passed; the checkpoint is then the previous step's).
    ``perturb`` applies a pending batch's perturbation on the device (``perturb_on: device``).
    The host waits for the device once per micro-batch (its sums) and once for the agreement.

    Returns a dict: ``stepped`` (bool), ``dropped`` (bool), ``skip`` (reason or None: "oom", "nonfinite",
    "empty"), ``stop`` (the agreed signal or None), and the rank-averaged ``loss``, ``alignment``,
    ``regularizer``, ``pairs`` (global).
    """
    local = run_micro_batches(parts, batches, cfg, env, perturb, stop)
    agreed = agree_on_step(env, local, stop)
    pairs, loss_sum, align_sum, reg_sum = agreed.sums
    result = {"stepped": False, "dropped": False, "skip": agreed.skip, "stop": agreed.stop}
    result["pairs"] = int(pairs)
    if agreed.cut:  # a rank stopped before its last micro-batch: every rank drops the step
        parts.optimizer.zero_grad(set_to_none=True)
        return {**result, "dropped": True, "skip": None, "pairs": 0}
    if agreed.skip is not None:
        result["pairs"] = 0  # a skipped step trains on nothing
        parts.optimizer.zero_grad(set_to_none=True)
        return result
    norm = apply_update(parts, cfg, env, local.flat, agreed.sums)
    if norm is None:
        result["skip"] = "nonfinite"
        return result
    result.update(
        stepped=True,
        loss=loss_sum / pairs,
        alignment=align_sum / pairs,
        regularizer=reg_sum / pairs,
        grad_norm=norm,
        lr=parts.scheduler.get_last_lr()[0],
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: LaserConfig,
    parts: Parts,
    items: list[AudioItem],
    state: TrainState,
    out: Path,
    env: DistEnv,
    stop: StopSignals,
    validator: Validator | None = None,
) -> TrainState:
    """Run optimizer steps until ``cfg.steps`` (or a stop signal); checkpoint every ``save_every`` steps.

    ``validator`` (optional) validates on held-out clips every ``eval_every`` steps and at the last one.
    """
    if state.step >= cfg.steps:
        logger.info("already at step %d of %d: nothing to train", state.step, cfg.steps)
        return state
    loader, sampler = build_data(cfg, items, env, state.position)
    perturb = loader.dataset.perturb
    writer = _tensorboard(out) if env.is_main else None
    progress = _progress(cfg, state, env)
    idle, started, pairs_at_start = 0, time.perf_counter(), state.pairs
    steps = _steps(loader, cfg.grad_accum_steps)
    try:
        while True:
            rng = checkpoints.capture_rng(env.device)  # a step dropped for a signal is retried from here
            batches = next(steps)
            result = train_step(parts, batches, cfg, env, stop, perturb)
            if result["dropped"]:
                drop_step(parts, state, cfg, out, env, rng, result["stop"])
                break
            count_batches(state, batches)
            batch = batches[-1]
            state.position = sampler.next_position(batch.position)
            state.pairs += result["pairs"]
            if result["stepped"]:
                state.step, idle = state.step + 1, 0
                rate = (state.pairs - pairs_at_start) / max(time.perf_counter() - started, 1e-9)
                _log_step(writer, progress, state, result, rate, cfg, validator)
                if validator is not None and validator.due(state.step, state.step >= cfg.steps):
                    validator.run(parts, state, out, writer)
                    _show(progress, result, rate, validator)
            else:
                state.counters[result["skip"]] += 1
                idle += 1
                logger.warning(
                    "step %d skipped (%s batch); skipped so far: %s",
                    state.step + 1, result["skip"], dict(state.counters),
                )  # fmt: skip
                if idle * cfg.grad_accum_steps >= max(sampler.batches_per_epoch(batch.position[0]), 1):
                    raise UserInputError(
                        f"no usable batch in a whole epoch of {cfg.data}; skipped: {dict(state.counters)}"
                    )
            done = state.step >= cfg.steps
            state.stop_signal = result["stop"]
            stopping = state.stop_signal is not None
            if stopping or done or (result["stepped"] and state.step % cfg.save_every == 0):
                save(parts, state, cfg, out, env)
            if stopping or done:
                break
    finally:
        # The workers stop here, not when the loader is freed: an exception's traceback keeps this frame
        # and the loader alive, and the workers ignore SIGTERM, so the interpreter's exit would wait on them
        # forever.
        stop_workers(loader)
        progress.close()
        if writer is not None:
            writer.close()
    if state.counters:
        logger.info("skipped during training: %s", dict(state.counters))
    return state


def drop_step(
    parts: Parts, state: TrainState, cfg: LaserConfig, out: Path, env: DistEnv, rng: dict, signum: int
) -> None:
    """A step the ranks dropped for a stop signal: the RNG back to where the step began (``rng``), so that
    the resumed run draws what the dropped step drew; the data position stays at its first batch; then the
    checkpoint of the step before it."""
    checkpoints.restore_rng(rng, env.device)
    state.stop_signal = signum
    logger.info(
        "signal %d during step %d: the step is dropped unfinished; saving step %d",
        signum, state.step + 1, state.step,
    )  # fmt: skip
    save(parts, state, cfg, out, env)


def count_batches(state: TrainState, batches: list[PairBatch]) -> None:
    """Add the clips the step's batches skipped (by reason) and cropped to the run's counters."""
    for batch in batches:
        for reason, count in batch.skipped.items():
            state.counters[reason] += count
        if batch.cropped:
            state.counters["cropped_to_budget"] += batch.cropped


def _steps(loader, accumulate: int):
    """The loader's (endless) micro-batches in lists that hold ``accumulate`` whole batches: one optimizer
    step each. A step thus always ends at a batch's last micro-batch (the resume position is never inside a
    step)."""
    micro_batches = iter(loader)
    while True:
        step, whole = [], 0
        while whole < accumulate:
            step.append(next(micro_batches))
            part, parts = step[-1].part
            whole += part + 1 == parts
        yield step


def _progress(cfg: LaserConfig, state: TrainState, env: DistEnv):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=state.step, disable=not env.is_main, desc="LASER", unit="step",
                dynamic_ncols=True, file=sys.stderr)  # fmt: skip


def _tensorboard(out: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _show(progress, result: dict, rate: float, validator: Validator | None) -> None:
    """Progress-bar postfix: the step's loss and pairs/s, and the newest validation metrics."""
    latest = validator.latest if validator is not None else {}
    progress.set_postfix(loss=f"{result['loss']:.4f}", pairs_s=f"{rate:.1f}", **latest)


def _log_step(writer, progress, state: TrainState, result: dict, rate: float, cfg: LaserConfig,
              validator: Validator | None = None) -> None:  # fmt: skip
    progress.update(1)
    _show(progress, result, rate, validator)
    if writer is not None and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
        for key in ("loss", "alignment", "regularizer", "lr", "grad_norm"):
            writer.add_scalar(f"train/{key}", result[key], state.step)
        writer.add_scalar("train/pairs_per_s", rate, state.step)
        for reason in SKIP_REASONS:
            writer.add_scalar(f"skipped/{reason}", state.counters[reason], state.step)
        writer.add_scalar("data/cropped_to_budget", state.counters["cropped_to_budget"], state.step)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def save(parts: Parts, state: TrainState, cfg: LaserConfig, out: Path, env: DistEnv) -> None:
    """Rank 0 writes the training checkpoint (all ranks' RNG states gathered into it); a failure to write it
    (a full disk) reaches every rank at once (:func:`~s3prl_laser.training.ranks.run_together`)."""
    check_ranks_in_sync(parts, env)
    rng = checkpoints.capture_rng(env.device)
    if env.distributed:
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        rng_all = gathered
    else:
        rng_all = [rng]

    def write() -> None:
        if not env.is_main:
            return
        checkpoint = {
            "model": trainable_state(parts),
            "head": {k: v.cpu() for k, v in parts.head.state_dict().items()},
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "step": state.step,
            "config": to_dict(cfg),
            "rng": rng_all,
            "data_position": {"epoch": state.position[0], "batch": state.position[1]},
            "counters": dict(state.counters),
            "pairs": state.pairs,
            "world_size": env.world_size,
            "validation": {
                "best_step": state.best_step,
                "best_value": state.best_value,
                "collapse_warned": state.collapse_warned,
            },
        }
        path = checkpoints.save_checkpoint(checkpoint, out, state.step)
        logger.info("checkpoint: %s", path)

    run_together(env, f"writing the checkpoint of step {state.step}", write)


TRAINING_KEYS = ("model", "head", "optimizer", "scheduler", "step", "config", "rng", "data_position")


def check_resumable(path: Path, checkpoint: dict, cfg: LaserConfig, env: DistEnv) -> None:
    """Raise ``UserInputError`` before any model is loaded if ``checkpoint`` cannot continue as ``cfg``.

    Refused: another number of processes than the checkpoint's (each takes its own share of every epoch's
    batches, so the data position means other data), and a key
    :data:`~s3prl_laser.training.config.RESUME_RULES` refuses whose value differs from the checkpoint's (a
    hand-edited ``config.yaml``).
    """
    saved = checkpoint.get("world_size", len(checkpoint["rng"]))
    if saved != env.world_size:
        raise UserInputError(
            f"--resume: {path} was written by {saved} process(es), this run has {env.world_size}: each "
            f"process takes its own share of the batches, so the data position would mean other data; "
            f"resume with {saved} process(es), or start a new run with another --out"
        )
    started = from_dict(checkpoint["config"])
    step, total = checkpoint["step"], checkpoint["scheduler"]["lr_lambdas"][0]["total_steps"]
    if total <= step < cfg.steps and step >= cfg.warmup_steps != started.warmup_steps:
        example = min(step + max(1, (cfg.steps - step) // 10), cfg.steps - 1)
        raise UserInputError(
            f"--resume: warmup_steps={cfg.warmup_steps}: the run finished at step {step}, and warmup_steps "
            f"is the step the warm-up ends at; give one between {step + 1} and {cfg.steps - 1} (e.g. "
            f"warmup_steps={example}), or leave it out for a decay from lr={cfg.lr:g} to 0 at step "
            f"{cfg.steps}"
        )
    refused = refused_changes(started, cfg)
    if refused:
        raise UserInputError(
            f"--resume: config.yaml differs from the checkpoint {path} in {'; '.join(refused)}: a resumed "
            f"run keeps these keys; restore them in config.yaml, or start a new run with another --out"
        )


def resume(
    parts: Parts,
    state: TrainState,
    cfg: LaserConfig,
    out: Path,
    env: DistEnv,
    found: tuple[Path, dict] | None,
) -> None:
    """Restore model, head, optimizer, schedule, RNG, data position and step from ``found`` (the newest
    checkpoint, :func:`read_newest_checkpoint`, passed by :func:`check_resumable`); then the optimizer and
    schedule take ``cfg``'s lr, weight decay, ``steps`` and warm-up (continuous at the resumed step)."""
    if found is None:
        logger.warning(
            "--resume: no checkpoint in %s; starting from step 0", checkpoints.checkpoint_dir(out)
        )
        return
    path, checkpoint = found
    missing = {n for n, p in parts.base.named_parameters() if p.requires_grad} - set(checkpoint["model"])
    if missing:
        raise UserInputError(
            f"checkpoint {path} lacks trainable parameters {sorted(missing)[:5]}: other trainable_layers?"
        )
    result = parts.base.load_state_dict(checkpoint["model"], strict=False)
    if result.unexpected_keys:
        raise UserInputError(
            f"checkpoint {path} has parameters the model lacks: {result.unexpected_keys[:5]}"
        )
    parts.head.load_state_dict(checkpoint["head"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    schedule, at = parts.scheduler.lr_lambdas[0], parts.scheduler.last_epoch
    before, restarts = (schedule.warmup_steps, schedule.total_steps), schedule.restarts(at, cfg.steps)
    apply_optimizer_config(parts, cfg)
    checkpoints.restore_rng(checkpoint["rng"][env.rank], env.device)
    state.step = checkpoint["step"]
    state.position = (checkpoint["data_position"]["epoch"], checkpoint["data_position"]["batch"])
    state.counters = Counter(checkpoint["counters"])
    state.pairs = checkpoint["pairs"]
    validation = checkpoint.get("validation", {})
    state.best_step, state.best_value = validation.get("best_step"), validation.get("best_value")
    state.collapse_warned = bool(validation.get("collapse_warned", False))
    if env.is_main and not best_still_holds(out, state.step):
        state.best_step = state.best_value = None
    logger.info("resumed from %s (step %d, data position %s)", path, state.step, state.position)
    if restarts:
        logger.info(
            "the run had finished at step %d (lr 0); its %d new steps follow a new schedule: %s",
            at, cfg.steps - at, schedule.describe(at, cfg.lr),
        )  # fmt: skip
    elif before != (schedule.warmup_steps, schedule.total_steps) and at < cfg.steps:
        logger.info("the schedule goes on without a jump: %s", schedule.describe(at, cfg.lr))


def best_still_holds(out: Path, step: int) -> bool:
    """Rank 0: whether the run's ``best.pt`` is a readable best of step ``step`` or before.

    False (the resumed run keeps its best anew) when there is none, when it is damaged (set aside by
    :func:`~s3prl_laser.training.checkpoints.read_best`), or when it is from after ``step``: then it is
    removed, since the resumed run validates those steps again, and starting its search afresh gives the same
    best as the interrupted run had once it passes that step (the removed best beat every earlier one).
    """
    best = checkpoints.read_best(out)
    if best is None:
        return False
    if best["step"] > step:
        path = checkpoints.best_path(out)
        logger.info("--resume: %s is from after step %d; the resumed run validates again", path, step)
        path.unlink()
        return False
    return True


def read_newest_checkpoint(out: Path, env: DistEnv) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` of the newest readable training checkpoint in ``out``; None if there is none.

    A damaged newest file (a disk fault, a copy stopped half-way) is reported naming it, renamed to
    ``*.damaged`` by rank 0 (so that it no longer counts among the kept checkpoints), and the one before
    it is used: that is why two are kept. Raises ``UserInputError`` if none is readable.
    """
    damaged = []
    for _, path in reversed(checkpoints.list_checkpoints(out)):
        try:
            checkpoint = checkpoints.load_checkpoint(path)
            missing = [key for key in TRAINING_KEYS if key not in checkpoint]
            if missing:
                raise DamagedCheckpointError(path, f"lacks {missing}: not a training checkpoint")
        except UserInputError as error:
            reason = error.reason if isinstance(error, DamagedCheckpointError) else str(error)
            logger.warning("--resume: %s is damaged (%s); trying the checkpoint before it", path, reason)
            damaged.append(path)
            continue
        for bad in damaged if env.is_main else ():
            bad.replace(bad.with_name(bad.name + ".damaged"))
            logger.warning("--resume: renamed %s to %s.damaged", bad.name, bad.name)
        return path, checkpoint
    if damaged:
        raise UserInputError(
            f"--resume: no readable checkpoint in {checkpoints.checkpoint_dir(out)} (damaged: "
            f"{', '.join(p.name for p in damaged)}); remove them to start from step 0, or restore a copy"
        )
    return None


def check_ranks_in_sync(parts: Parts, env: DistEnv) -> None:
    """Raise ``RuntimeError`` if the trainable weights differ between ranks (they must be bit-identical)."""
    if not env.distributed:
        return
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() + p.double().square().sum() for p in parts.trainable()])
    gathered = [torch.empty_like(fingerprint) for _ in range(env.world_size)]
    torch.distributed.all_gather(gathered, fingerprint)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError("DDP ranks hold different trainable weights")
    logger.info("all %d ranks hold identical trainable weights", env.world_size)
