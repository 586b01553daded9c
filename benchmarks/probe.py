"""Cost of the probe (s3prl_laser.probe) per hour of audio at base size, measured here, projected to one GPU.

A random-init base-size HuBERT (12 layers, 768 dims) through s3prl, on synthetic 12 s clips (LibriSpeech's
mean length): the seconds of feature extraction per hour of audio, and the seconds per head step (batch of
16 clips, 13 layers x 768). The GPU projection counts the FLOPs of both (torch's FlopCounterMode) and divides
by an assumed sustained bf16 throughput (``--gpu-tflops``, default 990 x 0.25: an H100's dense bf16 peak at
25 % utilisation), which the device-side check replaces with a measurement.

    python benchmarks/probe.py                      # about 2-4 minutes on 2 CPU cores
    python benchmarks/probe.py --clips 4 --steps 3  # quicker, noisier
    python benchmarks/probe.py --head-only          # the head step alone, the three ways (about 1 min)

The head step is timed three ways in one run, alternating, with medians of wall and CPU time:
- "first": as the probe first ran it (raw float16 features padded to ``[B, L, F, C]``, every layer normalised
  at every step, an einsum, torch's ctc_loss);
- "torch": features normalised once per clip when made, a float32 clip-by-clip weighted sum on torch's
  operations, torch's ctc_loss (``HeadSettings(backend="torch")``: what runs without a C compiler);
- "now": the same features on our C kernels (the weighted sum and the CTC loss; ``backend="auto"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
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

from s3prl_laser.console import setup_console  # noqa: E402
from s3prl_laser.probe.clips import Clip  # noqa: E402
from s3prl_laser.probe.features import UpstreamSpec, extract  # noqa: E402
from s3prl_laser.probe.head import ProbeHead, ctc_loss, normalise_layers  # noqa: E402

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


def write_librispeech(
    root: Path, train_seconds: float, dev_seconds: float, clip_seconds: float = CLIP_SECONDS, speakers=8
) -> Path:
    """A LibriSpeech-layout root of noise clips with random transcripts (about ``TARGETS_PER_SECOND``
    characters a second): ``train-clean-100`` and ``dev-clean`` of about the given lengths, for timing the
    probe end to end where no corpus can be downloaded. Speaker ids 9000 and up (no real one)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    for split, seconds, first in (("train-clean-100", train_seconds, 9000), ("dev-clean", dev_seconds, 9500)):
        count = max(speakers, round(seconds / clip_seconds))
        lines: dict[Path, list[str]] = {}
        for i in range(count):
            speaker, chapter = first + i % speakers, 1
            folder = root / split / str(speaker) / str(chapter)
            folder.mkdir(parents=True, exist_ok=True)
            utt = f"{speaker}-{chapter}-{i:04d}"
            audio = (0.1 * rng.standard_normal(int(clip_seconds * 16000))).astype("float32")
            soundfile.write(folder / f"{utt}.flac", audio, 16000)
            chars, words = int(clip_seconds * TARGETS_PER_SECOND), []
            while sum(len(w) + 1 for w in words) < chars:
                words.append("".join(rng.choice(letters, int(rng.integers(2, 9)))))
            lines.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt} {' '.join(words)}")
        for path, rows in lines.items():
            path.write_text("\n".join(rows) + "\n")
    return root


def time_probe(workdir: Path, device: str, train_hours: float, dev_minutes: float, steps: int,
               tiny: bool = False, clip_seconds: float = CLIP_SECONDS) -> dict:
    """``python -m s3prl_laser.probe`` end to end, timed: a base and a "tuned" upstream (random-init base-size
    HuBERTs of two seeds; tiny ones with ``tiny``) on a :func:`write_librispeech` corpus, every head running
    its whole step budget (no early stop). Returns the wall seconds, the settings and the heads' steps."""
    root = write_librispeech(workdir / "LibriSpeech", train_hours * 3600, dev_minutes * 60, clip_seconds)
    base = build_checkpoint("hubert", workdir / "base.pt", tiny=tiny, seed=0)
    tuned = build_checkpoint("hubert", workdir / "tuned.pt", tiny=tiny, seed=1)
    out = workdir / "probe"
    cmd = [sys.executable, "-m", "s3prl_laser.probe", "--data", str(root), "--out", str(out),
           "--upstream", f"hubert:{base}", "--upstream", f"hubert:{tuned}", "--train-hours", str(train_hours),
           "--dev-minutes", str(dev_minutes), "--steps", str(steps), "--patience", str(steps + 1),
           "--device", device]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"seconds": seconds, "failed": (proc.stdout + proc.stderr)[-2000:]}
    report = json.loads((out / "probe.json").read_text())
    return {"seconds": seconds, "train hours": train_hours, "dev minutes": dev_minutes, "steps": steps,
            "head steps run": [u["training"]["cer"]["steps"] for u in report["upstreams"]],
            "CER %": [round(100 * u["cer"], 2) for u in report["upstreams"]], "device": device}


class PerStepHead(torch.nn.Module):
    """The head step as it first was: the batch padded to ``[B, L, F, C]`` float16, every layer normalised
    at every step in float32, an einsum over layers, torch's ctc_loss (kept here as the first baseline)."""

    def __init__(self, head: ProbeHead) -> None:
        super().__init__()
        self.weights, self.out = head.weights, head.out

    def in_c(self) -> bool:
        return False

    def forward(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.tensor([c.shape[1] for c in clips])
        x = clips[0].new_zeros(len(clips), clips[0].shape[0], int(frames.max()), clips[0].shape[2])
        for i, c in enumerate(clips):
            x[i, :, : c.shape[1]] = c
        normed = torch.nn.functional.layer_norm(x.float(), x.shape[-1:])
        mixed = torch.einsum("l,blfc->bfc", torch.softmax(self.weights, dim=0), normed)
        return torch.log_softmax(self.out(mixed), dim=-1), frames


VARIANTS = ("first", "torch", "now")


def time_head_steps(
    feats: list[torch.Tensor], steps: int, batch: int
) -> tuple[dict[str, tuple[float, float]], float, dict[str, dict[str, float]]]:
    """Per-step ``{variant: (median wall s, median CPU s)}`` for :data:`VARIANTS`, FLOPs of a step, and how
    far "torch" and "now" agree with "first" on one batch (relative difference of the loss and of the layer
    weights' gradient).

    "first" steps on the raw float16 features, normalised at every step; "torch" and "now" on features
    normalised once per clip (as the probe stores them). Steps alternate between the three, so a load that
    comes and goes weighs on all alike. The three heads start from the same parameters.
    """
    chosen = [feats[i % len(feats)] for i in range(batch)]
    normed = [normalise_layers(c) for c in chosen]  # what the probe's feature cache holds
    targets = [[1 + (j % 28) for j in range(int(CLIP_SECONDS * TARGETS_PER_SECOND))]] * batch
    heads = {name: ProbeHead(feats[0].shape[0], feats[0].shape[2], 29, backend=backend)
             for name, backend in (("torch", "torch"), ("now", "auto"))}
    heads["now"].load_state_dict(heads["torch"].state_dict())
    first = ProbeHead(feats[0].shape[0], feats[0].shape[2], 29)
    first.load_state_dict(heads["torch"].state_dict())
    heads["first"] = PerStepHead(first)
    inputs = {"first": chosen, "torch": normed, "now": normed}
    optimizers = {name: torch.optim.AdamW(head.parameters(), lr=2e-3) for name, head in heads.items()}
    if not heads["now"].in_c():
        raise SystemExit("benchmarks/probe.py: the probe head's C kernels did not build here (see above)")

    def step(name: str) -> None:
        loss = ctc_loss(heads[name], inputs[name], targets)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    grads = {}
    for name in VARIANTS:
        heads[name].zero_grad()
        loss = ctc_loss(heads[name], inputs[name], targets)
        loss.backward()
        grads[name] = (float(loss), heads[name].weights.grad.clone())
    loss0, grad0 = grads["first"]
    agreement = {
        name: {"loss": abs(grads[name][0] - loss0) / abs(loss0),
               "layer weight gradient": float((grads[name][1] - grad0).abs().max() / grad0.abs().max())}
        for name in ("torch", "now")
    }
    with FlopCounterMode(display=False) as counter:
        step("torch")
    for name in VARIANTS:
        step(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(steps):
        for name in VARIANTS:
            wall, cpu = time.perf_counter(), time.process_time()
            step(name)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    medians = {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }
    return medians, counter.get_total_flops(), agreement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="12.3 s clips to extract (default 8)")
    parser.add_argument("--steps", type=int, default=7, help="timed head steps of each kind (default 7)")
    parser.add_argument(
        "--head-only", action="store_true", help="time the head step alone, on random features of that size"
    )
    parser.add_argument("--gpu-tflops", type=float, default=990 * 0.25, help="assumed sustained GPU TFLOP/s")
    args = parser.parse_args(argv)
    setup_console(logging.INFO, "%(message)s")
    load_before = os.getloadavg()[0]
    per_hour = extract_flops_hour = None
    if args.head_only:
        frames = int(CLIP_SECONDS * 50) - 1  # 50 frames per second, as the CNN gives
        generator = torch.Generator().manual_seed(0)
        feats = [torch.randn(13, frames, 768, generator=generator).half() for _ in range(args.clips)]
    else:
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
        per_hour = extract_s / audio_s * 3600
        extract_flops_hour = counter.get_total_flops() / audio_s * 3600
    steps, step_flops, agreement = time_head_steps(feats, args.steps, 16)
    gpu = args.gpu_tflops * 1e12
    threads = torch.get_num_threads()
    print(f"base-size HuBERT (random init), CPU, {threads} threads, {len(feats)} x {CLIP_SECONDS} s; load "
          f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
    print(f"{'':<48}{'CPU wall':>10}{'CPU time':>10}{'1 GPU (projected)':>20}")
    if per_hour is not None:
        label = "extraction, s per hour of audio"
        print(f"{label:<48}{per_hour:>10.0f}{'':>10}{extract_flops_hour / gpu:>20.1f}")
    for name in VARIANTS:
        wall, cpu = steps[name]
        label = f"head step (16 clips, 13 x 768), s, {name}"
        print(f"{label:<48}{wall:>10.3f}{cpu:>10.3f}{step_flops / gpu:>20.4f}")
    if per_hour is not None:
        # tuned + base on 1 h + 20 min: extraction of 4/3 h each, then at most 2000 head steps each (chars)
        for name in VARIANTS:
            cpu_total = 2 * (per_hour * 4 / 3 + 2000 * steps[name][0])
            gpu_total = 2 * (extract_flops_hour * 4 / 3 + 2000 * step_flops) / gpu
            label = f"tuned + base, 1 h + 20 min, 2000 steps, min, {name}"
            print(f"{label:<48}{cpu_total / 60:>10.0f}{'':>10}{gpu_total / 60:>20.1f}")
        print(f"(feature extraction {extract_flops_hour / 1e15:.1f} PFLOP per hour)")
    print(f"median of {args.steps} steps each, the three alternating; CPU time = process time (all threads), "
          "less sensitive to other jobs than wall time")
    print(f"head step speed-up, now vs first: {steps['first'][0] / steps['now'][0]:.1f}x, now vs torch: "
          f"{steps['torch'][0] / steps['now'][0]:.1f}x (wall)")
    for name in ("torch", "now"):
        print(f"{name} vs first on one batch: loss {agreement[name]['loss']:.1e}, layer weight gradient "
              f"{agreement[name]['layer weight gradient']:.1e} (relative; the features are normalised before "
              "their float16 rounding instead of after)")
    print(f"GPU projection: FLOPs / {args.gpu_tflops:.0f} TFLOP/s sustained (assumed: 25 % of an H100's "
          f"dense bf16 peak), head step {step_flops / 1e9:.1f} GFLOP; it ignores host-to-device copies "
          "(about 200 MB of features per step) and kernel launches, which bound the head step on a GPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
