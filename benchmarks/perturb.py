"""Throughput of the LASER second view (speed then +-2-semitone pitch shift) on 12-second clips.

Compares, on the same clips and the same parameter draws:
- torchaudio, per clip: ``functional.speed`` + ``functional.pitch_shift`` (builds its resampling kernel on
  every call);
- torchaudio, per clip: ``transforms.Speed`` + a cached ``transforms.PitchShift`` per semitone value (set-up
  time: its first calls, which build the kernels, minus steady calls);
- ours, per clip: ``LaserPerturbation.apply``;
- ours, batched: ``LaserPerturbation.apply_batch`` over ``--batch`` clips.

Prints seconds per clip (median over repeats) and pairs per second (one perturbed view per pair).

    python benchmarks/perturb.py                 # on the GPU when there is one, else the CPU
    python benchmarks/perturb.py --device cpu    # force the CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchaudio

from s3prl_laser.perturb import LaserPerturbation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=default_device, help="device of the clips (default: cuda if present)"
    )
    parser.add_argument("--preset", default="hubert", help="speed-factor preset: hubert or wavlm")
    parser.add_argument("--seconds", type=float, default=12.0, help="clip length")
    parser.add_argument("--batch", type=int, default=8, help="clips per batch (pairs per optimiser step)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of our batch (median reported)")
    parser.add_argument("--torchaudio-clips", type=int, default=2, help="clips timed for torchaudio (slow)")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    perturb = LaserPerturbation.from_preset(args.preset)
    sample_rate = perturb.sample_rate
    generator = torch.Generator().manual_seed(0)
    clips = [0.3 * torch.randn(int(args.seconds * sample_rate), generator=generator).to(device)]
    clips = clips * args.batch
    params = [perturb.sample_params(generator) for _ in clips]
    rows = []  # (method, set-up seconds = first call minus a steady call, seconds per clip)

    def ta_functional(clip, p):
        sped = torchaudio.functional.speed(clip, sample_rate, p.factor)[0]
        return torchaudio.functional.pitch_shift(sped, sample_rate, p.semitones)

    n_ta = min(args.torchaudio_clips, len(clips))
    times = [
        _timed(lambda c=c, p=p: ta_functional(c, p), device)
        for c, p in zip(clips[:n_ta], params[:n_ta], strict=True)
    ]
    rows.append(("torchaudio speed + functional.pitch_shift", 0.0, statistics.median(times)))

    shifters, first_calls = {}, []
    for p in params:
        if p.semitones not in shifters:
            shifters[p.semitones] = torchaudio.transforms.PitchShift(sample_rate, p.semitones).to(device)
            first_calls.append(_timed(lambda s=shifters[p.semitones]: s(clips[0]), device))
    speed = {f: torchaudio.transforms.Speed(sample_rate, f).to(device) for f in {p.factor for p in params}}
    times = [
        _timed(lambda c=c, p=p: shifters[p.semitones](speed[p.factor](c)[0]), device)
        for c, p in zip(clips[:n_ta], params[:n_ta], strict=True)
    ]
    setup = sum(first_calls) - len(first_calls) * statistics.median(times)
    rows.append(("torchaudio Speed + PitchShift (cached kernels)", setup, statistics.median(times)))

    fresh = LaserPerturbation.from_preset(args.preset)
    first_batch = _timed(lambda: fresh.apply_batch(clips, params), device)
    times = [
        _timed(
            lambda: [perturb.apply(c, p.factor, p.semitones) for c, p in zip(clips, params, strict=True)],
            device,
        )
        for _ in range(args.repeats)
    ]
    rows.append(("ours, one clip at a time", 0.0, statistics.median(times) / len(clips)))
    times = [_timed(lambda: perturb.apply_batch(clips, params), device) for _ in range(args.repeats)]
    setup = first_batch - statistics.median(times)
    rows.append((f"ours, batched ({len(clips)} clips)", setup, statistics.median(times) / len(clips)))

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"{args.seconds:g}-second clips, preset {args.preset}, device {device}, torch threads {threads}")
    print(f"| {'method':<48} | {'set-up s':>8} | {'s / clip':>8} | {'pairs / s':>9} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for method, setup_s, per_clip in rows:
        print(f"| {method:<48} | {setup_s:>8.2f} | {per_clip:>8.4f} | {1 / per_clip:>9.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
