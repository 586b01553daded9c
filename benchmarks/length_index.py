"""Start-up cost of finding the training clips and their lengths: a full scan vs the run's length index.

Writes ``--files`` tiny FLAC files (0.1 s each) in a LibriSpeech-like tree (``train-clean-100/<speaker>/
<chapter>/``), then times what ``python -m s3prl_laser.finetune`` does before loading any model
(``length_index.load_or_build_index``):

* cold start: no index yet: list the tree, read every header (one at a time, then with the default number
  of parallel reads), refuse held-out audio, write ``OUT/data_index.tsv``;
* warm start: the index exists (``--resume``, the other ranks): read it, without touching the audio.

The files are in the page cache (just written), so the header reads show the CPU cost; on network storage
each read also waits for a round trip, which the parallel reads overlap.

    python benchmarks/length_index.py --files 30000
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.length_index import INDEX_NAME, load_or_build_index, scan_jobs
from s3prl_laser.training.ranks import DistEnv


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=30000, help="audio files in the synthetic tree")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    return parser


def write_tree(root: Path, files: int) -> None:
    wav = (0.01 * np.random.default_rng(0).standard_normal(1600)).astype("float32")
    for number in range(files):
        speaker, chapter = number // 100, number // 25
        folder = root / "LibriSpeech" / "train-clean-100" / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        soundfile.write(folder / f"{speaker}-{chapter}-{number:04d}.flac", wav, 16000)


def timed_start(cfg, out: Path, jobs: int | None, fresh: bool) -> float:
    if fresh:
        (out / INDEX_NAME).unlink(missing_ok=True)
    start = time.perf_counter()
    load_or_build_index(cfg, out, DistEnv(), jobs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    jobs = scan_jobs()
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        write_tree(Path(tmp), args.files)
        print(f"{args.files} files written in {time.perf_counter() - began:.0f} s (in the page cache)")
        cfg = dataclasses.replace(resolve_config("hubert"), data=tmp)
        out = Path(tmp) / "run"
        rows = [
            ("cold start, 1 header read at a time", 1, True),
            (f"cold start, {jobs} parallel header reads", jobs, True),
            ("warm start (length index)", None, False),
        ]
        print(f"| {'start':<40} | {'seconds (median)':>16} |")
        print(f"|{'-' * 42}|{'-' * 18}|")
        for label, count, fresh in rows:
            seconds = statistics.median(timed_start(cfg, out, count, fresh) for _ in range(args.repeats))
            print(f"| {label:<40} | {seconds:>16.3f} |")
        print(f"index: {(out / INDEX_NAME).stat().st_size / 2**20:.1f} MiB for {args.files} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
