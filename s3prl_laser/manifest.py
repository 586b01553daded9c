"""Write a manifest with lengths for any corpus: ``python -m s3prl_laser.manifest``.

A manifest lists one audio file per line with its length in samples at the target rate (``path<TAB>samples``;
paths below the manifest's folder are written relative to it). Given as ``--data``, it is read without
opening a single audio file: for corpora of a million files, or on network storage, build it once here
(headers are read in parallel) and train from it.

Examples::

    python -m s3prl_laser.manifest /data/LibriSpeech --subsets train-clean-100 train-clean-360 -o train.tsv
    python -m s3prl_laser.manifest /data/my_audio -o my_audio.tsv --jobs 64
    python -m s3prl_laser.finetune --upstream hubert --data train.tsv --out runs/hubert
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from s3prl_laser.stacks import require_python

if TYPE_CHECKING:  # s3prl_laser.data imports torch: not before --help
    from s3prl_laser.data import AudioItem

logger = logging.getLogger("s3prl_laser.manifest")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.manifest",
        description="List a corpus' audio with lengths (samples) into a manifest that --data reads as is.",
    )
    parser.add_argument("data", help="LibriSpeech root (or its parent), folder of .flac/.wav, or manifest")
    parser.add_argument("-o", "--out", required=True, help="manifest file to write")
    parser.add_argument("--subsets", nargs="+", default=["train-clean-100"], help="LibriSpeech splits")
    parser.add_argument("--sample-rate", type=int, default=16000, help="lengths are counted at this rate")
    parser.add_argument(
        "--jobs", type=int, help="header reads in flight at once (default: 4 per CPU, at most 32)"
    )
    return parser


def manifest_lines(items: list[AudioItem], folder: Path) -> list[str]:
    """``path<TAB>samples`` lines; paths below ``folder`` relative to it, others absolute."""
    lines = []
    for item in items:
        path = Path(item.path).resolve()
        shown = path.relative_to(folder) if path.is_relative_to(folder) else path
        lines.append(f"{shown}\t{item.num_samples}")
    return lines


def main(argv: list[str] | None = None) -> int:
    require_python("python -m s3prl_laser.manifest")
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from s3prl_laser.data import describe_splits, find_audio, measure_lengths
    from s3prl_laser.training.length_index import scan_jobs

    args.jobs = scan_jobs() if args.jobs is None else args.jobs
    out = Path(args.out).expanduser()
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs} must be >= 1")
        start = time.perf_counter()
        found = find_audio(args.data, args.subsets)
        listed = time.perf_counter()
        items, dropped = measure_lengths(found, args.sample_rate, args.jobs)
    except ValueError as error:
        logger.error("error: %s", error)
        return 2
    measured = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {len(items)} clips from {args.data}, lengths in samples at {args.sample_rate} Hz"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join([header, *manifest_lines(items, out.parent.resolve())]) + "\n")
    os.replace(tmp, out)
    hours = sum(item.num_samples for item in items) / args.sample_rate / 3600
    print(
        f"{out}: {len(items)} clips, {hours:.2f} h ({describe_splits(items, args.sample_rate)}); "
        f"{dropped} unreadable skipped; listed in {listed - start:.1f} s, headers read in "
        f"{measured - listed:.1f} s with {args.jobs} jobs",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
