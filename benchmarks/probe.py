"""Cost of the probe (s3prl_laser.probe) per hour of audio at base size, measured here, projected to one GPU.

A random-init base-size HuBERT (12 layers, 768 dims) through s3prl, on synthetic 12 s clips (LibriSpeech's
mean length): the seconds of feature extraction per hour of audio, and the seconds per head step (batch of
16 clips, 13 layers x 768). The GPU projection counts the FLOPs of both (torch's FlopCounterMode) and divides
by an assumed sustained bf16 throughput (``--gpu-tflops``, default 990 x 0.25: an H100's dense bf16 peak at
25 % utilisation), which the device-side check replaces with a measurement.

    python benchmarks/probe.py                      # about 2-4 minutes on 2 CPU cores
    python benchmarks/probe.py --clips 4 --steps 3  # quicker, noisier
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_throughput import build_checkpoint  # noqa: E402  (a sibling script, not a package)

from s3prl_laser.probe.clips import Clip  # noqa: E402
from s3prl_laser.probe.features import UpstreamSpec, extract  # noqa: E402
from s3prl_laser.probe.head import ProbeHead, ctc_loss  # noqa: E402

CLIP_SECONDS = 12.3  # LibriSpeech train-clean-100 mean utterance length
TARGETS_PER_SECOND = 15  # characters per second of read speech, about


def write_clips(folder: Path, count: int) -> list[Clip]:
    rng = np.random.default_rng(0)
    clips = []
    for i in range(count):
        path = folder / f"clip{i}.flac"
        soundfile.write(path, (0.1 * rng.standard_normal(int(CLIP_SECONDS * 16000))).astype("float32"), 16000)
        clips.append(Clip(str(path), f"clip{i}", "0", "", CLIP_SECONDS))
    return clips


def time_head_steps(feats: list[torch.Tensor], steps: int, batch: int) -> tuple[float, float]:
    """(median seconds per head step, FLOPs per step) with ``batch`` clips drawn from ``feats``."""
    head = ProbeHead(feats[0].shape[0], feats[0].shape[2], 29)
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    chosen = [feats[i % len(feats)] for i in range(batch)]
    targets = [[1 + (j % 28) for j in range(int(CLIP_SECONDS * TARGETS_PER_SECOND))]] * batch

    def step() -> None:
        loss = ctc_loss(head, chosen, targets, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="12.3 s clips to extract (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed head steps (default 5)")
    parser.add_argument("--gpu-tflops", type=float, default=990 * 0.25, help="assumed sustained GPU TFLOP/s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint("hubert", Path(tmp) / "base.pt", tiny=False, seed=0)
        clips = write_clips(Path(tmp), args.clips)
        spec = UpstreamSpec("hubert_local", str(ckpt))
        extract(spec, clips[:1], torch.device("cpu"))  # warm-up
        start = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            feats = extract(spec, clips, torch.device("cpu"))
        extract_s = time.perf_counter() - start
    audio_s = CLIP_SECONDS * len(clips)
    step_s, step_flops = time_head_steps(feats, args.steps, 16)
    per_hour = extract_s / audio_s * 3600
    extract_flops_hour = counter.get_total_flops() / audio_s * 3600
    gpu = args.gpu_tflops * 1e12
    # tuned + base on 1 h + 20 min: extraction of 4/3 h each, then at most 2000 head steps each (chars)
    cpu_total = 2 * (per_hour * 4 / 3 + 2000 * step_s)
    gpu_total = 2 * (extract_flops_hour * 4 / 3 + 2000 * step_flops) / gpu
    threads = torch.get_num_threads()
    print(f"base-size HuBERT (random init), CPU, {threads} threads, {len(clips)} x {CLIP_SECONDS} s")
    print(f"{'':<44}{'CPU (measured)':>16}{'1 GPU (projected)':>20}")
    print(f"{'extraction, s per hour of audio':<44}{per_hour:>16.0f}{extract_flops_hour / gpu:>20.1f}")
    print(f"{'head step (16 clips, 13 x 768), s':<44}{step_s:>16.3f}{step_flops / gpu:>20.4f}")
    label = "tuned + base, 1 h + 20 min, 2000 steps, min"
    print(f"{label:<44}{cpu_total / 60:>16.0f}{gpu_total / 60:>20.1f}")
    print(f"(GPU: FLOPs / {args.gpu_tflops:.0f} TFLOP/s; feature extraction "
          f"{extract_flops_hour / 1e15:.1f} PFLOP per hour, head step {step_flops / 1e9:.1f} GFLOP)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
