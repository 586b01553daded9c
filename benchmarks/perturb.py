"""Throughput of the LASER second view (speed then +-2-semitone pitch shift) on 12-second clips.

Compares, on the same clips and the same parameter draws:
- torchaudio, per clip: ``functional.speed`` + ``functional.pitch_shift`` (builds its resampling kernel on
  every call);
- torchaudio, per clip: ``transforms.Speed`` + a cached ``transforms.PitchShift`` per semitone value (its
  first calls build the kernels and are reported apart);
- ours, per clip: ``LaserPerturbation.apply``;
- ours, batched: ``LaserPerturbation.apply_batch`` over ``--batch`` clips.

Prints seconds per clip (median over repeats, the methods interleaved so that they share the machine's
load) and pairs per second (one perturbed view per pair).

    python benchmarks/perturb.py                 # on the GPU when there is one, else the CPU
    python benchmarks/perturb.py --device cpu    # force the CPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchaudio
from measure import timed

from s3prl_laser.objective.perturb import LaserPerturbation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=default_device, help="device of the clips (default: cuda if present)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--preset", default="hubert", help="speed-factor preset: hubert or wavlm")
    parser.add_argument("--seconds", type=float, default=12.0, help="clip length")
    parser.add_argument("--batch", type=int, default=8, help="clips per batch (pairs per optimiser step)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of our batch (median reported)")
    parser.add_argument("--torchaudio-clips", type=int, default=2, help="clips timed for torchaudio (slow)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    perturb = LaserPerturbation.from_preset(args.preset)
    sample_rate = perturb.sample_rate
    generator = torch.Generator().manual_seed(0)
    length = int(args.seconds * sample_rate)
    clips = [0.3 * torch.randn(length, generator=generator).to(device) for _ in range(args.batch)]
    params = [perturb.sample_params(generator) for _ in clips]

    def ta_functional(clip, p):
        sped = torchaudio.functional.speed(clip, sample_rate, p.factor)[0]
        return torchaudio.functional.pitch_shift(sped, sample_rate, p.semitones)

    shifters = {
        s: torchaudio.transforms.PitchShift(sample_rate, s).to(device) for s in {p.semitones for p in params}
    }
    speeders = {f: torchaudio.transforms.Speed(sample_rate, f).to(device) for f in {p.factor for p in params}}

    def ta_cached(clip, p):
        return shifters[p.semitones](speeders[p.factor](clip)[0])

    def ours_single():
        return [perturb.apply(c, p.factor, p.semitones) for c, p in zip(clips, params, strict=True)]

    # first calls, which build kernels/tables (PitchShift: one per semitone value)
    first = {"ta_cached": sum(timed(lambda s=s: s(clips[0]), device) for s in shifters.values())}
    first["ours_batch"] = timed(lambda: perturb.apply_batch(clips, params), device)
    n_ta = min(args.torchaudio_clips, len(clips))
    ta_functional_times = [
        timed(lambda k=k: ta_functional(clips[k], params[k]), device) for k in range(n_ta)
    ]
    times = {"ta_cached": [], "ours_single": [], "ours_batch": []}
    for r in range(args.repeats):  # interleaved, so that every method sees the same machine load
        k = r % len(clips)
        times["ta_cached"].append(timed(lambda k=k: ta_cached(clips[k], params[k]), device))
        times["ours_single"].append(timed(ours_single, device) / len(clips))
        times["ours_batch"].append(timed(lambda: perturb.apply_batch(clips, params), device) / len(clips))
    rows = [  # (method, first call s, seconds per clip)
        (
            "torchaudio speed + functional.pitch_shift",
            ta_functional_times[0],
            statistics.median(ta_functional_times),
        ),
        (
            "torchaudio Speed + PitchShift (cached kernels)",
            first["ta_cached"],
            statistics.median(times["ta_cached"]),
        ),
        ("ours, one clip at a time", None, statistics.median(times["ours_single"])),
        (f"ours, batched ({len(clips)} clips)", first["ours_batch"], statistics.median(times["ours_batch"])),
    ]

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"{args.seconds:g}-second clips, preset {args.preset}, device {device}, torch threads {threads}")
    print(f"first call: the first call's seconds, kernel set-up included; median of {args.repeats} repeats")
    print(f"| {'method':<48} | {'first call s':>12} | {'s / clip':>8} | {'pairs / s':>9} |")
    print(f"|{'-' * 50}|{'-' * 14}|{'-' * 10}|{'-' * 11}|")
    for method, first_s, per_clip in rows:
        first_text = "-" if first_s is None else f"{first_s:.2f}"
        print(f"| {method:<48} | {first_text:>12} | {per_clip:>8.4f} | {1 / per_clip:>9.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
