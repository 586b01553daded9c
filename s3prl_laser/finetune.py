"""LASER fine-tuning of HuBERT/WavLM in one command: ``python -m s3prl_laser.finetune``.

Pipeline of one step: a batch of (view, view) pairs from ``s3prl_laser.data`` -> the upstream (frozen CNN and
lower layers under ``no_grad``, top ``trainable_layers`` trained) -> last hidden state -> projection head
(+ L2 norm) -> ``LaserLoss`` -> AdamW step with gradient clipping and a linear warm-up/decay schedule.

Examples::

    python -m s3prl_laser.finetune --upstream hubert --data /data/LibriSpeech --out runs/hubert
    python -m s3prl_laser.finetune --upstream wavlm --data clips.txt --out runs/w steps=100 lr=1e-4
    python -m s3prl_laser.finetune --upstream hubert --out runs/hubert --resume     # continue a run
    torchrun --nproc_per_node 4 -m s3prl_laser.finetune --upstream hubert --data ... --out runs/ddp
    python -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo         # tiny, CPU, < 2 min

Outputs in ``--out``: ``config.yaml`` (resolved), ``checkpoints/step_*.pt`` (training state, resumable),
``tb/`` (TensorBoard), and ``<upstream>_laser.pt``: the tuned upstream in s3prl's own checkpoint format.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from s3prl_laser import checkpointing
from s3prl_laser.config import UPSTREAMS, LaserConfig, resolve_config, to_dict, write_config
from s3prl_laser.data import (
    AudioItem,
    BucketBatchSampler,
    PairBatch,
    PairDataset,
    build_loader,
    find_audio,
    measure_lengths,
    next_position,
)
from s3prl_laser.loss import LaserLoss, LaserLossOutput, ProjectionHead
from s3prl_laser.perturb import LaserPerturbation
from s3prl_laser.runtime import (
    DistEnv,
    StopSignals,
    agree,
    barrier,
    ignore_signals_in_worker,
    setup_distributed,
    setup_logging,
    teardown_distributed,
)

logger = logging.getLogger("s3prl_laser.finetune")

SKIP_REASONS = ("unreadable", "too_short", "nonfinite", "empty")


# ----------------------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.finetune",
        description="LASER soft-DTW alignment fine-tuning of a HuBERT/WavLM upstream (s3prl format in/out).",
    )
    parser.add_argument(
        "--upstream", required=True, choices=UPSTREAMS, help="base model family (picks the preset)"
    )
    parser.add_argument("--config", help="YAML of config keys merged over the upstream's preset")
    parser.add_argument("--data", help="LibriSpeech root, folder of .flac/.wav, or manifest file")
    parser.add_argument("--ckpt", help="base upstream checkpoint (default: s3prl's hubert_base/wavlm_base)")
    parser.add_argument("--out", help="run directory (default: runs/<upstream>_laser)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--demo", action="store_true", help="tiny bundled model and corpus, then a report")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    env = setup_distributed(args.device)
    setup_logging(env)
    try:
        return run(args, env)
    except (ValueError, FileNotFoundError) as error:  # bad config, data or checkpoint: message, exit 2
        logger.error("error: %s", error)
        return 2
    finally:
        teardown_distributed(env)


def run(args: argparse.Namespace, env: DistEnv) -> int:
    """Resolve the config, check the data, train, export; return the exit status."""
    out = Path(args.out or f"runs/{args.upstream}_laser")
    extra = {key: value for key, value in (("data", args.data), ("ckpt", args.ckpt)) if value is not None}
    cfg = resolve_config(args.upstream, args.config, args.overrides, demo=args.demo, extra=extra)
    if args.demo:
        cfg = prepare_demo(cfg, out, env)
    items = scan_data(cfg)  # data errors come before any model is loaded
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    with StopSignals() as stop:
        parts = build_model(cfg, env)
        state = TrainState()
        if args.resume:
            resume(parts, state, cfg, out, env)
        train(cfg, parts, items, state, out, env, stop)
        if stop.signum is not None:
            logger.info("stopped by signal %d at step %d; resume with --resume", stop.signum, state.step)
            return 128 + stop.signum
    if env.is_main:
        final = export_upstream(parts, cfg, out)
        logger.info("tuned upstream written to %s", final)
        if args.demo:
            from s3prl_laser.report import S3prlLastLayer, demo_report

            head = seeded_head(cfg, parts.base.hidden_size)  # the untuned head, as training started
            before = (S3prlLastLayer(f"{cfg.upstream}_local", cfg.ckpt).to(env.device), head.to(env.device))
            after = (S3prlLastLayer(f"{cfg.upstream}_laser", final).to(env.device), parts.head)
            demo_report(cfg, before, after, out, tuned_in_memory=parts.base)
    return 0


# ----------------------------------------------------------------------------------------------------------
# data


def prepare_demo(cfg: LaserConfig, out: Path, env: DistEnv) -> LaserConfig:
    """``--demo``: the bundled corpus, and a tiny random-init upstream built into ``out`` (unless given)."""
    from s3prl_laser import fixtures

    updates = {}
    if cfg.data is None:
        updates["data"] = str(fixtures.demo_corpus_root())
    if cfg.ckpt is None:
        path = out / f"tiny_{cfg.upstream}.pt"
        if env.is_main and not path.exists():
            fixtures.build_tiny(cfg.upstream, path, seed=cfg.seed)
        barrier(env)
        updates["ckpt"] = str(path)
    return dataclasses.replace(cfg, **updates)


def scan_data(cfg: LaserConfig) -> list[AudioItem]:
    """Find the training clips and their lengths; ``ValueError`` naming the path if there are none."""
    if cfg.data is None:
        raise ValueError("no training data: give --data (LibriSpeech root, audio folder or manifest)")
    items, dropped = measure_lengths(find_audio(cfg.data, cfg.data_subsets), cfg.sample_rate)
    hours = sum(item.num_samples for item in items) / cfg.sample_rate / 3600
    logger.info(
        "data: %d clips (%.2f h) from %s; %d unreadable skipped", len(items), hours, cfg.data, dropped
    )
    return items


def build_data(
    cfg: LaserConfig, items: list[AudioItem], env: DistEnv, start: tuple[int, int]
) -> tuple[torch.utils.data.DataLoader, BucketBatchSampler]:
    """DataLoader of pair batches for this rank, starting at sampler position ``start``."""
    perturb = LaserPerturbation(cfg.speed_factors, cfg.pitch_semitones, cfg.sample_rate)
    dataset = PairDataset(
        items, perturb, cfg.sample_rate, cfg.max_seconds, cfg.min_samples, cfg.swap_prob, cfg.seed
    )
    sampler = BucketBatchSampler(
        [item.num_samples for item in items],
        cfg.batch_size,
        cfg.bucket_batches,
        cfg.seed,
        env.rank,
        env.world_size,
        start,
    )
    loader = build_loader(
        dataset, sampler, cfg.num_workers, cfg.seed, worker_init_fn=ignore_signals_in_worker
    )
    return loader, sampler


# ----------------------------------------------------------------------------------------------------------
# model, optimizer, schedule


class LaserModel(nn.Module):
    """The upstream plus the projection head: ``wavs [B, T], lengths [B] -> (z [B, F, D], frames [B])``."""

    def __init__(self, base: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.base, self.head = base, head

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, frames = self.base(wavs, lengths)
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
    from s3prl_laser.upstream import load_base_model

    base = load_base_model(cfg.upstream, cfg.ckpt)
    n_base = base.freeze(cfg.trainable_layers, train_final_layer_norm=cfg.train_final_layer_norm)
    return base, seeded_head(cfg, base.hidden_size), n_base


def seeded_head(cfg: LaserConfig, hidden_size: int) -> ProjectionHead:
    """The projection head as initialised from ``cfg.seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ProjectionHead(hidden_size, cfg.proj_dim)


def build_model(cfg: LaserConfig, env: DistEnv) -> Parts:
    """Load and freeze the upstream; add the head, loss, AdamW and schedule (DDP-wrapped if distributed)."""
    base, head, n_base = build_upstream(cfg)
    model = LaserModel(base, head).to(env.device)
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
        module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    loss_fn = LaserLoss(
        cfg.gamma, cfg.alpha, cfg.sigma, cfg.margin, cfg.loss_type, cfg.bandwidth, cfg.softdtw_backend
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, cfg.warmup_steps, cfg.steps)
    )
    return Parts(base, head, model, module, loss_fn, optimizer, scheduler)


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup`` up to 1, then linear to ~0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# ----------------------------------------------------------------------------------------------------------
# one step


@dataclass
class TrainState:
    """Progress: optimizer steps done, sampler position of the next batch, counts of skipped things."""

    step: int = 0
    position: tuple[int, int] = (0, 0)
    counters: Counter = field(default_factory=Counter)
    pairs: int = 0


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


def train_step(parts: Parts, batch: PairBatch, cfg: LaserConfig, env: DistEnv, stop_requested: bool) -> dict:
    """Forward, loss, and (when every rank's loss is finite) backward, clip and optimizer step.

    Returns a dict: ``stepped`` (bool), ``skip`` (reason or None), ``stop`` (any rank asked to stop),
    and the rank-averaged ``loss``, ``alignment``, ``regularizer``, ``pairs`` (global count).
    """
    out = None
    if batch.num_pairs > 0:
        z, frames = forward_pairs(parts.module, batch, env, cfg)
        out = pair_loss(parts.loss_fn, z, frames, batch.num_pairs)
    empty = out is None
    nonfinite = not empty and not bool(torch.isfinite(out.loss))
    sums = [0.0, 0.0, 0.0, 0.0]  # pairs, loss * pairs, alignment, regularizer: only from a usable batch
    if not empty and not nonfinite:
        b = batch.num_pairs
        sums = [b, out.loss.item() * b, out.alignment.sum().item(), out.regularizer.sum().item()]
    flags = [float(empty), float(nonfinite), float(stop_requested)]
    any_empty, any_nonfinite, any_stop, pairs, loss_sum, align_sum, reg_sum = agree(env, flags + sums)
    result = {"stepped": False, "skip": None, "stop": any_stop > 0, "pairs": int(pairs)}
    if any_empty or any_nonfinite:
        result["skip"] = "nonfinite" if any_nonfinite else "empty"
        parts.optimizer.zero_grad(set_to_none=True)
        return result
    out.loss.backward()
    norm = nn.utils.clip_grad_norm_(parts.trainable(), cfg.grad_clip)
    if not torch.isfinite(norm):
        parts.optimizer.zero_grad(set_to_none=True)
        result["skip"] = "nonfinite"
        return result
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    result.update(
        stepped=True,
        loss=loss_sum / pairs,
        alignment=align_sum / pairs,
        regularizer=reg_sum / pairs,
        grad_norm=float(norm),
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
) -> TrainState:
    """Run optimizer steps until ``cfg.steps`` (or a stop signal); checkpoint every ``save_every`` steps."""
    if state.step >= cfg.steps:
        logger.info("already at step %d of %d: nothing to train", state.step, cfg.steps)
        return state
    loader, sampler = build_data(cfg, items, env, state.position)
    per_epoch = sampler.batches_per_epoch()
    writer = _tensorboard(out) if env.is_main else None
    progress = _progress(cfg, state, env)
    idle, started, pairs_at_start = 0, time.perf_counter(), state.pairs
    try:
        for batch in loader:
            for reason, count in batch.skipped.items():
                state.counters[reason] += count
            result = train_step(parts, batch, cfg, env, stop.signum is not None)
            state.position = next_position(batch.position, per_epoch)
            state.pairs += result["pairs"]
            if result["stepped"]:
                state.step, idle = state.step + 1, 0
                rate = (state.pairs - pairs_at_start) / max(time.perf_counter() - started, 1e-9)
                _log_step(writer, progress, state, result, rate, cfg)
            else:
                state.counters[result["skip"]] += 1
                idle += 1
                logger.warning(
                    "step %d skipped (%s batch); skipped so far: %s",
                    state.step + 1, result["skip"], dict(state.counters),
                )  # fmt: skip
                if idle >= max(per_epoch, 1):
                    raise ValueError(
                        f"no usable batch in a whole epoch of {cfg.data}; skipped: {dict(state.counters)}"
                    )
            done = state.step >= cfg.steps
            if result["stop"] or done or (result["stepped"] and state.step % cfg.save_every == 0):
                save(parts, state, cfg, out, env)
            if result["stop"] or done:
                break
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if state.counters:
        logger.info("skipped during training: %s", dict(state.counters))
    return state


def _progress(cfg: LaserConfig, state: TrainState, env: DistEnv):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=state.step, disable=not env.is_main, desc="LASER", unit="step",
                dynamic_ncols=True, file=sys.stderr)  # fmt: skip


def _tensorboard(out: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _log_step(writer, progress, state: TrainState, result: dict, rate: float, cfg: LaserConfig) -> None:
    progress.update(1)
    progress.set_postfix(loss=f"{result['loss']:.4f}", pairs_s=f"{rate:.1f}")
    if writer is not None and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
        for key in ("loss", "alignment", "regularizer", "lr", "grad_norm"):
            writer.add_scalar(f"train/{key}", result[key], state.step)
        writer.add_scalar("train/pairs_per_s", rate, state.step)
        for reason in SKIP_REASONS:
            writer.add_scalar(f"skipped/{reason}", state.counters[reason], state.step)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def trainable_state(parts: Parts) -> dict[str, torch.Tensor]:
    """The upstream's trainable parameters by name (the frozen rest comes from ``--ckpt``)."""
    return {name: p.detach().cpu() for name, p in parts.base.named_parameters() if p.requires_grad}


def save(parts: Parts, state: TrainState, cfg: LaserConfig, out: Path, env: DistEnv) -> None:
    """Rank 0 writes the training checkpoint (all ranks' RNG states gathered into it)."""
    check_ranks_in_sync(parts, env)
    rng = checkpointing.capture_rng(env.device)
    if env.distributed:
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        rng_all = gathered
    else:
        rng_all = [rng]
    if env.is_main:
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
        }
        path = checkpointing.save_checkpoint(checkpoint, out, state.step)
        logger.info("checkpoint: %s", path)
    barrier(env)


def resume(parts: Parts, state: TrainState, cfg: LaserConfig, out: Path, env: DistEnv) -> None:
    """Restore model, head, optimizer, schedule, RNG, data position and step from the newest checkpoint."""
    path = checkpointing.latest_checkpoint(out)
    if path is None:
        logger.warning(
            "--resume: no checkpoint in %s; starting from step 0", checkpointing.checkpoint_dir(out)
        )
        return
    checkpoint = checkpointing.load_checkpoint(path)
    changed = {k for k, v in checkpoint["config"].items() if to_dict(cfg).get(k) != v}
    if changed:
        logger.warning(
            "--resume: config differs from the checkpoint's in %s (using the new values)", sorted(changed)
        )
    missing = {n for n, p in parts.base.named_parameters() if p.requires_grad} - set(checkpoint["model"])
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks trainable parameters {sorted(missing)[:5]}: other trainable_layers?"
        )
    result = parts.base.load_state_dict(checkpoint["model"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} has parameters the model lacks: {result.unexpected_keys[:5]}")
    parts.head.load_state_dict(checkpoint["head"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    rng = checkpoint["rng"]
    if len(rng) != env.world_size:
        logger.warning(
            "--resume: checkpoint from %d processes, now %d: RNG streams differ", len(rng), env.world_size
        )
    checkpointing.restore_rng(rng[env.rank % len(rng)], env.device)
    state.step = checkpoint["step"]
    state.position = (checkpoint["data_position"]["epoch"], checkpoint["data_position"]["batch"])
    state.counters = Counter(checkpoint["counters"])
    state.pairs = checkpoint["pairs"]
    logger.info("resumed from %s (step %d, data position %s)", path, state.step, state.position)


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


def export_upstream(parts: Parts, cfg: LaserConfig, out: Path) -> Path:
    """Write the tuned upstream as ``OUT/<upstream>_laser.pt`` in s3prl's own checkpoint format."""
    from s3prl_laser.upstream import save_s3prl_checkpoint

    return save_s3prl_checkpoint(parts.base.state_for_s3prl(), out / f"{cfg.upstream}_laser.pt")


if __name__ == "__main__":
    raise SystemExit(main())
