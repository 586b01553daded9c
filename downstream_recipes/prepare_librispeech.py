"""Data preparation for s3prl's SUPERB recipes on a LibriSpeech-layout corpus.

A LibriSpeech tree is ``ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` plus one
``<speaker>-<chapter>.trans.txt`` per chapter (``<utt-id> WORDS IN CAPITALS`` per line). s3prl's
ASR downstream (``-d asr``) reads bucket tables that its source tree makes with
``preprocess/generate_len_for_bucket.py`` (absent from the PyPI package): one ``<split>.csv`` per
split, columns ``file_path`` (relative to ``libri_root``), ``length`` (samples) and ``label``
(here the transcript). This module writes them, and the word-level CSVs
(``wav_path``, ``transcription``) that newer s3prl checkouts' ``libriphone`` corpus reads.

Command line::

    python downstream_recipes/prepare_librispeech.py --librispeech ROOT --out DIR/len_for_bucket \\
        --splits train-clean-100 dev-clean test-clean

Example::

    >>> from prepare_librispeech import read_split
    >>> utterances = read_split("LibriSpeech", "test-clean")  # doctest: +SKIP
    >>> utterances[0].file_path, utterances[0].length             # doctest: +SKIP
    ('test-clean/1089/134686/1089-134686-0000.flac', 166960)
"""

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from recipe_env import require_modules  # this script's folder

require_modules("downstream_recipes/prepare_librispeech.py", ("soundfile",))

import soundfile  # noqa: E402

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    """One utterance: path relative to the corpus root, length in samples, transcript (capitals)."""

    file_path: str
    length: int
    transcript: str


def read_transcripts(chapter_dir: Path) -> dict[str, str]:
    """``{utterance id: transcript}`` from the chapter's ``<speaker>-<chapter>.trans.txt``."""
    speaker, chapter = chapter_dir.parent.name, chapter_dir.name
    trans_file = chapter_dir / f"{speaker}-{chapter}.trans.txt"
    if not trans_file.is_file():
        raise ValueError(f"{trans_file} is missing: each LibriSpeech chapter folder needs its transcripts")
    transcripts = {}
    for line_number, line in enumerate(trans_file.read_text().splitlines(), start=1):
        if line.strip():
            utt_id, _, words = line.strip().partition(" ")
            if not words:
                raise ValueError(f"{trans_file}:{line_number}: expected '<utterance-id> WORDS', got {line!r}")
            transcripts[utt_id] = words
    return transcripts


def chapter_dirs(root: str | Path, split: str) -> list[Path]:
    """The ``<speaker>/<chapter>`` folders of ``root/split``, sorted."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ValueError(f"split folder {split_dir} not found; --librispeech must be the folder of {split}/")
    return sorted(p for p in split_dir.glob("*/*") if p.is_dir())


def read_split(root: str | Path, split: str) -> list[Utterance]:
    """All utterances of ``root/split``, sorted by path; audio must be 16 kHz (s3prl's loaders assert it)."""
    root = Path(root)
    split_dir = root / split
    utterances = []
    for chapter_dir in chapter_dirs(root, split):
        transcripts = read_transcripts(chapter_dir)
        for audio in sorted(chapter_dir.glob("*.flac")):
            if audio.stem not in transcripts:
                raise ValueError(f"{audio} has no line in its chapter's .trans.txt")
            try:
                info = soundfile.info(str(audio))
            except (RuntimeError, OSError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
                raise ValueError(f"{audio}: unreadable audio ({error}); replace or remove it") from None
            if info.samplerate != SAMPLE_RATE:
                raise ValueError(f"{audio} is sampled at {info.samplerate} Hz; SUPERB uses {SAMPLE_RATE} Hz")
            relative = audio.relative_to(root).as_posix()
            utterances.append(Utterance(relative, info.frames, transcripts[audio.stem]))
    if not utterances:
        raise ValueError(f"no .flac utterances under {split_dir}")
    return utterances


def write_bucket_csvs(root: str | Path, splits: list[str], out_dir: str | Path) -> Path:
    """Write ``out_dir/<split>.csv`` (``file_path``, ``length``, ``label``) per split; return ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with open(out_dir / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["file_path", "length", "label"])
            for utt in read_split(root, split):
                writer.writerow([utt.file_path, utt.length, utt.transcript])
    return out_dir


def write_word_csv(root: str | Path, split: str, out_file: str | Path) -> Path:
    """Write a ``wav_path`` (absolute), ``transcription`` CSV: the table of s3prl's ``libriphone`` corpus."""
    root = Path(root).resolve()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["wav_path", "transcription"])
        for utt in read_split(root, split):
            writer.writerow([str(root / utt.file_path), utt.transcript])
    return out_file


def check_characters(root: str | Path, splits: list[str], dict_path: str | Path) -> None:
    """Raise ``ValueError`` if a transcript has a character the ASR dictionary lacks (s3prl: silent <unk>)."""
    symbols = {line.split()[0] for line in Path(dict_path).read_text().splitlines() if line.strip()}
    for split in splits:
        for chapter_dir in chapter_dirs(root, split):  # transcripts only: no audio header is read here
            for utt_id, transcript in read_transcripts(chapter_dir).items():
                unknown = sorted(set(transcript.replace(" ", "|")) - symbols)
                if unknown:
                    raise ValueError(f"{split}/{utt_id}: characters {unknown} are not in {dict_path}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write s3prl's LibriSpeech bucket CSVs for SUPERB ASR.")
    parser.add_argument("--librispeech", required=True, type=Path, help="folder holding the split folders")
    parser.add_argument("--out", required=True, type=Path, help="bucket_file folder for <split>.csv")
    parser.add_argument("--splits", nargs="+", default=["train-clean-100", "dev-clean", "test-clean"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    print(f"bucket CSVs: {write_bucket_csvs(args.librispeech, args.splits, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
