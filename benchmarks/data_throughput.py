"""Pairs per second of the fine-tuning data path, beside what the paper's recipe asks of it on a GPU.

Writes ``--clips`` synthetic 12-second 16-kHz FLAC clips (amplitude-modulated noise; the average
LibriSpeech train-clean-100 utterance is 12.7 s), then runs the real loader of
``python -m s3prl_laser.finetune`` (``trainer.build_data``: length index items, budgeted bucket sampler,
``PairDataset`` reading, cropping and perturbing, ``collate_pairs``) with the preset's settings:

* ``perturb_on: workers`` with 0 (all in this process, one thread: also timed in CPU seconds, the figure
  that projects to a machine with more cores), 1, 2 and all DataLoader workers (all = this machine's CPUs);
* ``perturb_on: device``: the workers only read and crop; the training process perturbs each batch on
  ``--device`` in one batched call (the step's own ``complete_pairs``), which is timed with the loader.

The first ``--warmup`` batches (worker start-up, resampling tables) are not timed; then ``--batches``
batches are. The demand column is the paper's recipe (8 pairs per step) at ``--step-ms`` per step, the
time of one fine-tuning step on the GPU (measure it with ``benchmarks/finetune_throughput.py``).

    python benchmarks/data_throughput.py             # CPU workers; on-device perturbation on cuda if any
    python benchmarks/data_throughput.py --clips 16 --batches 2 --warmup 1 --workers 1   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from s3prl_laser.data import complete_pairs
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.length_index import scan, scan_jobs
from s3prl_laser.training.loop import build_data
from s3prl_laser.training.ranks import DistEnv

PAPER_PAIRS = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", default="hubert", choices=("hubert", "wavlm"), help="preset to use")
    parser.add_argument("--clips", type=int, default=96, help="synthetic 12 s clips")
    parser.add_argument("--seconds", type=float, default=12.0, help="clip length")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2 all)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-ms", type=float, nargs=2, default=(60.0, 100.0), metavar=("FAST", "SLOW"),
                        help="GPU time of one 8-pair step (default: H200 estimate)")  # fmt: skip
    return parser


def write_clips(folder: Path, count: int, seconds: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    for index in range(count):
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * np.arange(n) / 16000 + rng.uniform(0, 6.3))
        wav = (0.1 * envelope * rng.standard_normal(n)).astype("float32")
        soundfile.write(folder / f"clip{index:05d}.flac", wav, 16000)


def pairs_per_second(cfg, items, workers: int, device: torch.device, warmup: int, batches: int):
    """Time ``batches`` batches of the real loader (plus on-device perturbation when configured).

    Returns (pairs per wall-clock second, pairs per CPU-second of this process). With 0 workers everything
    runs here on one thread, so the second figure is what one worker does on a core of its own, however
    busy the machine is.
    """
    cfg = dataclasses.replace(cfg, num_workers=workers)
    loader, _ = build_data(cfg, items, DistEnv(device=device), (0, 0))
    perturb = loader.dataset.perturb
    stream = iter(loader)
    pairs, start, cpu_start = 0, 0.0, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        for number in range(warmup + batches):
            if number == warmup:
                start, cpu_start = time.perf_counter(), time.process_time()
            batch = complete_pairs(next(stream), perturb, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if number >= warmup:
                pairs += batch.num_pairs
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(threads)
    del stream, loader  # stops the workers
    return pairs / elapsed, pairs / cpu


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = args.workers or sorted({0, 1, 2, cpus})
    fast, slow = (PAPER_PAIRS / (ms / 1000) for ms in args.step_ms)
    device = torch.device(args.device)
    print(f"{args.clips} clips of {args.seconds:g} s, {args.upstream}_laser preset, {cpus} CPUs; demand of "
          f"the paper's recipe: {PAPER_PAIRS} pairs per {args.step_ms[0]:g}-{args.step_ms[1]:g} ms step = "
          f"{slow:.0f}-{fast:.0f} pairs/s")  # fmt: skip
    print(
        f"| {'perturbation':<22} | {'workers':>7} | {'pairs/s':>8} | {'pairs/CPU-s':>11} | {'vs demand':>9} |"
    )
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 10}|{'-' * 13}|{'-' * 11}|")
    per_core = None
    with tempfile.TemporaryDirectory() as tmp:
        write_clips(Path(tmp), args.clips, args.seconds)
        cfg = dataclasses.replace(resolve_config(args.upstream), data=tmp, seed=0)
        items = scan(cfg, scan_jobs())
        settings = [("workers (CPU)", n, "workers", torch.device("cpu")) for n in counts]
        settings.append((f"device ({device.type}, batched)", max(counts[0], 1), "device", device))
        for label, workers, where, on in settings:
            rate, per_cpu = pairs_per_second(
                dataclasses.replace(cfg, perturb_on=where), items, workers, on, args.warmup, args.batches
            )
            in_process = workers == 0
            per_core = per_cpu if in_process and where == "workers" else per_core
            cpu_cell = f"{per_cpu:>11.1f}" if in_process else f"{'-':>11}"
            print(f"| {label:<22} | {workers:>7} | {rate:>8.1f} | {cpu_cell} | {rate / fast:>8.2f}x |")
    print(
        "pairs/CPU-s: with 0 workers (all in this process, one thread): what one worker does on its own core"
    )
    print("vs demand: pairs/s over the fast end of the demand (>= 1: the loader keeps up)")
    if per_core is not None:
        projected = 15 * per_core
        print(f"projection, 16 cores and one GPU: 15 workers x {per_core:.1f} pairs/CPU-s = {projected:.0f} "
              f"pairs/s, {projected / fast:.1f}x the fast end of the demand")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
