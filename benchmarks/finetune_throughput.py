"""Throughput of LASER fine-tuning steps, where the time goes, and what the paper's recipe would cost.

Builds a random-init upstream of base size (12 layers, 768 dims, the real CNN; ``--tiny``: the 4-layer test
model), writes synthetic clips whose durations follow LibriSpeech train-clean-100 (about N(12.7 s, 3.5 s)
clipped to [1.4 s, 24.5 s]), and runs ``--steps`` optimizer steps with the exact pieces of
``python -m s3prl_laser.finetune`` (same data loader, model, loss, optimizer; each step is one call of
:func:`s3prl_laser.training.loop.train_step` on the step's micro-batches, as the trainer makes it), timing:

* data: time the training process waits for the step's micro-batches (reading, cropping and perturbing run
  in the DataLoader workers, in parallel with the step);
* step: ``train_step`` itself: forward, loss and backward of each micro-batch, the ranks' agreement,
  gradient clipping, AdamW;
* soft-DTW alone (measured apart, on the projections of the step's last micro-batch): divergence forward
  + backward;
* perturbation alone (measured apart, in this process): reading, crop and perturbation of one pair;
* one validation (measured apart, after the steps): :func:`s3prl_laser.training.heldout.measure` on
  ``eval_clips`` held-out pairs, as the trainer runs it every ``eval_every`` steps, and its share of the
  training time of those ``eval_every`` steps.

The first ``--warmup`` steps are not timed. The preset is used as configured (batch size, crop, bf16
autocast on CUDA) unless an option overrides it. Prints one table row per upstream, with pairs/s, the peak
memory of the run and the projected time of the paper's recipe (3600 steps x 8 pairs) at that speed.

    python benchmarks/finetune_throughput.py                          # base size, on the GPU if any
    python benchmarks/finetune_throughput.py --tiny --steps 3 --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch
from measure import PeakMemory, sync, timed

from s3prl_laser import fixtures
from s3prl_laser.data import complete_pairs
from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint
from s3prl_laser.names import UPSTREAMS
from s3prl_laser.softdtw import soft_dtw_divergence
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.heldout import eval_mode, make_pairs, measure
from s3prl_laser.training.length_index import scan, scan_jobs
from s3prl_laser.training.loop import _steps, build_data, forward_pairs, train_step
from s3prl_laser.training.parts import build_model
from s3prl_laser.training.ranks import DistEnv

BASE_ARCH = {  # the base models' architecture, restored over the fixtures' tiny one
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "conv_pos": 128,
    "conv_pos_groups": 16,
}
PAPER_STEPS, PAPER_PAIRS = 3600, 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstreams", nargs="+", default=["hubert", "wavlm"], choices=UPSTREAMS)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel set-up, caches)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: the preset's)")
    parser.add_argument("--max-seconds", type=float, default=None, help="crop (default: the config's)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: config's)")
    parser.add_argument("--tiny", action="store_true", help="the 4-layer test model instead of base size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-clips", type=int, default=None, help="validation clips (default: config's)")
    return parser


def synthetic_corpus(folder: Path, count: int, seed: int, max_seconds: float | None) -> None:
    """``count`` 16-kHz FLAC clips of amplitude-modulated noise with LibriSpeech-like durations."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.normal(12.7, 3.5, count), 1.4, 24.5)
    if max_seconds is not None:  # nothing past the crop is ever used: keep the files small
        seconds = np.minimum(seconds, max_seconds + 0.5)
    for index, duration in enumerate(seconds):
        n = int(duration * 16000)
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * np.arange(n) / 16000 + rng.uniform(0, 6.3))
        wav = (0.1 * envelope * rng.standard_normal(n)).astype("float32")
        soundfile.write(folder / f"clip{index:05d}.flac", wav, 16000)


def build_checkpoint(upstream: str, path: Path, tiny: bool, seed: int) -> Path:
    if tiny:
        return fixtures.build_tiny(upstream, path, seed=seed)
    if upstream == "hubert":
        return save_s3prl_checkpoint(fixtures.tiny_hubert_state(seed, final_dim=256, **BASE_ARCH), path)
    if upstream == "wav2vec2":  # wav2vec2_base_960's quantizer: 2 groups of 320 codes, final_dim 256
        state = fixtures.tiny_wav2vec2_state(seed, final_dim=256, latent_vars=320, **BASE_ARCH)
        return save_s3prl_checkpoint(state, path)
    if upstream == "data2vec":  # data2vec base: 5 positional convolutions of kernel 19
        state = fixtures.tiny_data2vec_state(seed, **{**BASE_ARCH, "conv_pos": 95, "pos_conv_depth": 5})
        return save_s3prl_checkpoint(state, path)
    return save_s3prl_checkpoint(fixtures.tiny_wavlm_state(seed, **BASE_ARCH), path)


def run_one(upstream: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Time ``args.steps`` steps of ``upstream``; return seconds per step of each phase and pairs/s."""
    device = torch.device(args.device)
    overrides = [f"seed={args.seed}"]
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    if args.max_seconds is not None:
        overrides.append(f"max_seconds={args.max_seconds}")
    if args.workers is not None:
        overrides.append(f"num_workers={args.workers}")
    if args.eval_clips is not None:
        overrides.append(f"eval_clips={args.eval_clips}")
    cfg = resolve_config(upstream, overrides=overrides)
    corpus = workdir / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        clips = max(4 * cfg.batch_size, (args.steps + args.warmup) * cfg.batch_size, cfg.eval_clips)
        synthetic_corpus(corpus, clips, args.seed, cfg.max_seconds)
    ckpt = build_checkpoint(upstream, workdir / f"{upstream}.pt", args.tiny, args.seed)
    cfg = dataclasses.replace(cfg, data=str(corpus), ckpt=str(ckpt))
    env = DistEnv(device=device)
    phases: dict[str, list[float]] = {k: [] for k in ("data", "step", "softdtw")}
    pairs = 0
    with PeakMemory(device) as memory:
        parts = build_model(cfg, env)
        items = scan(cfg, scan_jobs())
        loader, _ = build_data(cfg, items, env, (0, 0))
        perturb, steps = loader.dataset.perturb, _steps(loader, cfg.grad_accum_steps)
        for step in range(args.warmup + args.steps):
            t0 = sync(device)
            batches = next(steps)
            t1 = sync(device)
            result = train_step(parts, batches, cfg, env, None, perturb)
            t2 = sync(device)
            softdtw = time_softdtw(parts, batches[-1], cfg, env, perturb)
            if step >= args.warmup:
                for key, value in zip(phases, (t1 - t0, t2 - t1, softdtw), strict=True):
                    phases[key].append(value)
                pairs += result["pairs"]
    result = {key: statistics.fmean(values) for key, values in phases.items()}
    step_time = result["data"] + result["step"]
    result["pairs_per_s"] = pairs / (step_time * args.steps)
    result["perturb"] = time_perturbation(loader.dataset, min(len(items), 8))
    result["step_total"] = step_time
    result["peak_mib"] = memory.peak / 2**20
    result["batch_size"] = cfg.batch_size
    result["pairs_per_step"] = pairs / args.steps  # every micro-batch of the step (0 for a skipped step)
    result["precision"] = cfg.precision if device.type == "cuda" else "fp32"
    result["validation"] = time_validation(parts, cfg, items, device)
    result["validation_share"] = result["validation"] / (cfg.eval_every * step_time)
    return result


def time_validation(parts, cfg, items, device: torch.device) -> float:
    """Seconds of one validation on ``eval_clips`` clips (bf16 autocast on CUDA, as in training)."""
    pairs = make_pairs(items[: cfg.eval_clips], cfg)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision == "bf16" else None
    with eval_mode(parts.base, parts.head):
        measure(parts.base, parts.head, pairs[:2], cfg.gamma, amp_dtype)  # kernel set-up, untimed
        return timed(lambda: measure(parts.base, parts.head, pairs, cfg.gamma, amp_dtype), device)


def projected_hours(pairs_per_s: float) -> float:
    """Hours of the paper's recipe (3600 steps x 8 pairs) at ``pairs_per_s``, one process."""
    return PAPER_STEPS * PAPER_PAIRS / pairs_per_s / 3600


def time_softdtw(parts, batch, cfg, env: DistEnv, perturb) -> float:
    """Seconds of the soft-DTW divergence (forward + backward) on the projections of ``batch``."""
    with torch.no_grad():
        done = complete_pairs(batch, perturb, env.device)
        z, frames = forward_pairs(parts.module, done, env, cfg)
    b = done.num_pairs
    x, y = z[:b].float().requires_grad_(True), z[b:].float().requires_grad_(True)
    return timed(lambda: soft_dtw_divergence(x, y, cfg.gamma, frames[:b], frames[b:], cfg.bandwidth,
                                             cfg.softdtw_backend).sum().backward(), env.device)


def time_perturbation(dataset, count: int) -> float:
    """Seconds to read, crop and perturb one pair in this process (median of ``count`` clips)."""
    cpu = torch.device("cpu")
    return statistics.median(timed(lambda k=k: dataset[(k, 99, 0)], cpu) for k in range(count))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    size = "tiny (4 layers, 64 dims)" if args.tiny else "base size (12 layers, 768 dims), random init"
    batch = "the preset's" if args.batch_size is None else args.batch_size
    print(f"device: {args.device}; model: {size}; {batch} pairs/step; {args.steps} timed steps")
    header = (
        f"{'upstream':<8} {'pairs':>5} {'pairs/s':>8} {'step s':>8} {'data':>6} {'sdtw s':>8}"
        f" {'perturb s':>10} {'peak MiB':>9} {'3600x8 h':>9} {'val s':>7} {'val %':>6}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for upstream in args.upstreams:
            r = run_one(upstream, args, Path(tmp))
            projected = projected_hours(r["pairs_per_s"])
            print(
                f"{upstream:<8} {r['pairs_per_step']:>5.1f} {r['pairs_per_s']:>8.2f} {r['step_total']:>8.3f} "
                f"{100 * r['data'] / r['step_total']:>5.0f}% {r['softdtw']:>8.4f} {r['perturb']:>10.4f} "
                f"{r['peak_mib']:>9.0f} {projected:>9.2f} {r['validation']:>7.2f} "
                f"{100 * r['validation_share']:>6.2f}"
            )
    print(
        "pairs: pairs of a step (all its micro-batches); step s: waiting for data + trainer.train_step; "
        "data: share of the step spent waiting for the loader; "
        "sdtw s: soft-DTW divergence fwd+bwd alone on the step's last micro-batch; "
        "perturb s: read+crop+perturb one pair on one core (the workers do this in parallel); "
        "peak MiB: peak memory of the run over what was allocated before it (CUDA: allocator; CPU: RSS); "
        "3600x8 h: projected hours of the paper's recipe on this device, one process; "
        "val s: one validation on eval_clips clips; val %: its share of the eval_every steps between two"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
