"""Peak memory of one LASER training step at base size, per batch shape, and what it predicts per preset.

Each measurement runs in a fresh process: a random-init base-size upstream (12 layers, 768 dims, as in
``benchmarks/finetune_throughput.py``), the preset's loss and optimizer, then one full step (forward of both
views, loss, backward, clipping, AdamW) on a batch of ``pairs`` pairs whose two views are ``seconds`` long.
On a CPU it reports the process' peak resident memory (``VmHWM``) and its growth over the state right
before the step; on a GPU ``torch.cuda.max_memory_allocated``.

Under the budget a step runs as micro-batches, one forward/backward pass each, its gradients accumulated in
buffers that the measured step already holds: a step's peak is that of its largest micro-batch. The step's
memory grows with the padded audio of the batch and, through attention and the soft-DTW tables,
with each row's length squared. ``--fit`` fits ``peak = a + b * rows * s + c * rows * s^2`` (rows = 2 x pairs,
s = seconds per view) to the measured points by least squares and prints, for each preset's
``max_batch_seconds`` budget, the largest micro-batch the budget admits (of the longest views) and its
predicted peak.

    python benchmarks/peak_memory.py --upstream hubert --shapes 1x4 1x8 2x4 1x12 --fit   # CPU: a few minutes
    python benchmarks/peak_memory.py --upstream wavlm --shapes 8x12 4x24 2x44 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from s3prl_laser.data import PairBatch, clip_limit_samples, view_stretch
from s3prl_laser.names import UPSTREAMS
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.loop import train_step
from s3prl_laser.training.parts import build_model
from s3prl_laser.training.ranks import DistEnv

LIBRI_LONGEST, LIBRI_MEAN = 24.5, 12.7  # seconds: train-clean-100's longest and average utterance
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_throughput import BASE_ARCH, build_checkpoint  # noqa: E402  (a sibling script, not a package)
from measure import sync  # noqa: E402

from s3prl_laser.fixtures import build_tiny  # noqa: E402
from s3prl_laser.training.config import read_preset  # noqa: E402

LARGE_ARCH = {  # HuBERT/WavLM/wav2vec 2.0 Large: 24 pre-LN layers of 1024 dims, layer-norm CNN with bias
    **BASE_ARCH, "encoder_layers": 24, "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096,
    "encoder_attention_heads": 16, "layer_norm_first": True, "extractor_mode": "layer_norm",
    "conv_bias": True,
}  # fmt: skip
# data2vec-audio large is post-LN (every layer keeps activations) with base's positional convolutions
LARGE_ARCH_OF = {"data2vec": {**LARGE_ARCH, "layer_norm_first": False, "conv_pos": 95, "pos_conv_depth": 5}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", default="hubert", choices=UPSTREAMS)
    parser.add_argument("--size", default="base", choices=("base", "large"),
                        help="model size (large: 24 layers, 1024 dims, pre-LN) and preset")  # fmt: skip
    parser.add_argument("--shapes", nargs="+", default=["1x4", "1x8", "2x4"], help="PAIRSxSECONDS per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fit", action="store_true", help="fit the memory model and predict per preset")
    parser.add_argument("--target-gib", type=float, default=20.0, help="peak a budget must stay under")
    parser.add_argument("--coefficients", type=float, nargs=3, metavar=("A_GIB", "B_MIB", "C_MIB"),
                        help="skip measuring: predict from a fit printed earlier")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one shape in this process
    return parser


def vm_hwm_bytes() -> int:
    """Peak resident memory of this process so far (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_one(upstream: str, pairs: int, seconds: float, device: str, size: str = "base") -> dict:
    """One step at ``size`` on a ``[2 * pairs, seconds * 16000]`` batch; peak memory in bytes."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if size == "large":
            arch = LARGE_ARCH_OF.get(upstream, LARGE_ARCH)
            ckpt = build_tiny(upstream, Path(tmp) / "large.pt", seed=0, **arch)
        else:
            ckpt = build_checkpoint(upstream, Path(tmp) / "base.pt", tiny=False, seed=0)
        cfg = dataclasses.replace(resolve_config(upstream), ckpt=str(ckpt))
        env = DistEnv(device=torch.device(device))
        parts = build_model(cfg, env)
    samples = int(seconds * cfg.sample_rate)
    batch = PairBatch(wavs=0.1 * torch.randn(2 * pairs, samples), lengths=torch.full((2 * pairs,), samples))
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
        before = torch.cuda.memory_allocated(env.device)
    else:
        gc.collect()  # hand memory freed while building the model back to the system (glibc keeps it
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # otherwise, and the step's peak would hide in it: Large)
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
        before = vm_rss_bytes()
    start = sync(env.device)
    result = train_step(parts, [batch], cfg, env, None)
    elapsed = sync(env.device) - start
    peak = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else vm_hwm_bytes()
    return {"pairs": pairs, "seconds": seconds, "peak": peak, "before": before, "step_s": elapsed,
            "stepped": result["stepped"]}  # fmt: skip


def fit(points: list[dict]) -> tuple[float, float, float]:
    """Least-squares ``peak = a + b * rows * s + c * rows * s^2`` over the measured points."""
    rows = torch.tensor(
        [[1.0, 2 * p["pairs"] * p["seconds"], 2 * p["pairs"] * p["seconds"] ** 2] for p in points]
    )
    peaks = torch.tensor([float(p["peak"]) for p in points])
    solution = torch.linalg.lstsq(rows.double(), peaks.double()[:, None]).solution[:, 0]
    return tuple(float(v) for v in solution)


def predicted_peak(coefficients, pairs: int, view_seconds: float) -> float:
    a, b, c = coefficients
    rows = 2 * pairs
    return a + b * rows * view_seconds + c * rows * view_seconds**2


def predicted_worst_step(coefficients, budget: float, stretch: float, longest_clip: float, batch_size: int):
    """The micro-batch of highest predicted peak that a budget admits: ``(peak, pairs, seconds per view)``.

    Views run from 0.5 s to the longest clip (cropped to one pair's share of the budget) x ``stretch``; a
    micro-batch of views of ``L`` seconds holds ``min(batch_size, budget // (2 L))`` pairs (at least one).
    """
    longest_view = min(longest_clip, budget / (2 * stretch)) * stretch
    worst = (0.0, 1, 0.0)
    for view in [tenth / 10 for tenth in range(5, int(longest_view * 10) + 1)] + [longest_view]:
        pairs = max(1, min(batch_size, int(budget // (2 * view))))
        worst = max(worst, (predicted_peak(coefficients, pairs, view), pairs, view))
    return worst


def worst_step(upstream: str) -> tuple[int, float] | None:
    """``(pairs, seconds per view)`` of the largest micro-batch the preset's budget admits: the longest
    views (clips cropped to ``max_seconds`` and to one pair's share of the budget); None without a budget."""
    cfg = resolve_config(upstream)
    if cfg.max_batch_seconds is None:
        return None
    limit = clip_limit_samples(cfg.max_seconds, cfg.max_batch_seconds, cfg.speed_factors, cfg.sample_rate)
    longest = limit * view_stretch(cfg.speed_factors) / cfg.sample_rate
    return max(1, min(cfg.batch_size, int(cfg.max_batch_seconds // (2 * longest)))), longest


def preset_config(upstream: str, size: str = "base"):
    """The preset of ``upstream`` at ``size`` (large: ``<upstream>_large_laser.yaml`` over the family's)."""
    cfg = resolve_config(upstream)
    return cfg if size == "base" else dataclasses.replace(cfg, **read_preset(f"{upstream}_large_laser"))


def budget_report(upstream: str, coefficients, target_gib: float, size: str = "base") -> None:
    """Predicted peaks of the preset's budget (worst step, LibriSpeech worst step, average step), and the
    largest budget (multiple of 10 s) whose worst step stays under ``target_gib``."""
    cfg = preset_config(upstream, size)
    name = f"{upstream}_large_laser" if size == "large" else f"{upstream}_laser"
    stretch = view_stretch(cfg.speed_factors)
    crop = cfg.max_seconds if cfg.max_seconds is not None else 3600.0
    budgets = [cfg.max_batch_seconds] if cfg.max_batch_seconds is not None else []
    for budget in budgets:
        peak, pairs, view = predicted_worst_step(coefficients, budget, stretch, crop, cfg.batch_size)
        libri, libri_pairs, libri_view = predicted_worst_step(
            coefficients, budget, stretch, LIBRI_LONGEST, cfg.batch_size
        )
        typical_pairs = max(1, min(cfg.batch_size, int(budget // (2 * LIBRI_MEAN * stretch))))
        typical = predicted_peak(coefficients, typical_pairs, LIBRI_MEAN * stretch)
        print(
            f"preset {name}, max_batch_seconds={budget:g}: worst step {pairs} x {view:.1f} s views "
            f"{peak / 2**30:.1f} GiB; on train-clean-100 (clips <= {LIBRI_LONGEST} s) {libri_pairs} x "
            f"{libri_view:.1f} s {libri / 2**30:.1f} GiB; average clip ({LIBRI_MEAN} s) {typical_pairs} "
            f"pairs {typical / 2**30:.1f} GiB"
        )

    def worst(budget: int) -> float:
        return predicted_worst_step(coefficients, budget, stretch, crop, cfg.batch_size)[0]

    fitting = [budget for budget in range(10, 1001, 10) if worst(budget) <= target_gib * 2**30]
    if fitting:
        print(f"largest budget whose worst step is predicted under {target_gib:g} GiB: {max(fitting)} s")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.one:
        pairs, seconds = args.one.split("x")
        print(json.dumps(measure_one(args.upstream, int(pairs), float(seconds), args.device, args.size)))
        return 0
    if args.coefficients:
        a_gib, b_mib, c_mib = args.coefficients
        coefficients = (a_gib * 2**30, b_mib * 2**20, c_mib * 2**20)
        budget_report(args.upstream, coefficients, args.target_gib, args.size)
        return 0
    print(f"{args.upstream}, {args.size} size, random init, device {args.device}: one step per process")
    print(f"{'pairs':>5} {'s/view':>7} {'rows x s':>9} {'peak GiB':>9} {'step GiB':>9} {'step s':>7}")
    points = []
    for shape in args.shapes:
        cmd = [sys.executable, __file__, "--upstream", args.upstream, "--device", args.device, "--one", shape,
               "--size", args.size]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{shape}: failed (exit {done.returncode})\n{done.stderr[-2000:]}")
            return 1
        point = json.loads(done.stdout.strip().splitlines()[-1])
        points.append(point)
        print(
            f"{point['pairs']:>5} {point['seconds']:>7.1f} {2 * point['pairs'] * point['seconds']:>9.1f} "
            f"{point['peak'] / 2**30:>9.2f} {(point['peak'] - point['before']) / 2**30:>9.2f} "
            f"{point['step_s']:>7.1f}"
        )
    if args.fit and len(points) >= 3:
        a, b, c = fit(points)
        print(
            f"fit: peak = {a / 2**30:.2f} GiB + {b / 2**20:.1f} MiB x rows*s + {c / 2**20:.2f} MiB x rows*s^2"
        )
        budget_report(args.upstream, (a, b, c), args.target_gib, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
