"""Which clips the probe uses: a seeded, speaker-balanced subset of a LibriSpeech split, with transcripts.

Training clips come from ``train-clean-100``, evaluation clips from ``dev-clean``; ``test-*`` is never
read. Within a split, speakers take turns (a seeded order of speakers, a seeded order of each speaker's
clips) until the asked duration is reached, so an hour of training audio spreads over every speaker
rather than exhausting the first ones. A split holding less than asked is used whole (the log says so).

Example::

    >>> train, dev = probe_clips("/data/LibriSpeech", 1.0, 20.0, seed=0)  # doctest: +SKIP
    >>> train[0].utt_id, train[0].text, train[0].seconds  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import soundfile

from s3prl_laser.data import librispeech_root
from s3prl_laser.errors import UserInputError

logger = logging.getLogger("s3prl_laser.probe")
TRAIN_SPLIT, EVAL_SPLIT = "train-clean-100", "dev-clean"


@dataclass(frozen=True)
class Clip:
    path: str
    utt_id: str
    speaker: str
    text: str  # LibriSpeech transcript: upper-case words
    seconds: float


def probe_clips(
    data: str | Path, train_hours: float, dev_minutes: float, seed: int
) -> tuple[list[Clip], list[Clip]]:
    """``(training clips, evaluation clips)``: about ``train_hours`` of ``train-clean-100`` and
    ``dev_minutes`` of ``dev-clean`` under ``data`` (the LibriSpeech root or its parent)."""
    root = probe_root(data)
    return (
        balanced_subset(read_split(root / TRAIN_SPLIT), train_hours * 3600, seed, f"{root / TRAIN_SPLIT}"),
        balanced_subset(read_split(root / EVAL_SPLIT), dev_minutes * 60, seed, f"{root / EVAL_SPLIT}"),
    )


def probe_root(data: str | Path, option: str = "--data") -> Path:
    """The LibriSpeech root under ``data`` that holds both probe splits; ``UserInputError`` naming ``option``
    otherwise (a cheap check, made before any expensive work)."""
    root = librispeech_root(Path(data).expanduser()) if Path(data).expanduser().is_dir() else None
    if root is None:
        raise UserInputError(
            f"{option} {data}: not a LibriSpeech root (no split folders in it or in LibriSpeech/)"
        )
    for split in (TRAIN_SPLIT, EVAL_SPLIT):
        if not (root / split).is_dir():
            raise UserInputError(
                f"{option} {root}: no {split}/ folder; the probe trains on {TRAIN_SPLIT} "
                f"and scores on {EVAL_SPLIT}"
            )
    return root


def read_split(folder: Path) -> dict[str, list[tuple[str, str, str]]]:
    """``{speaker: [(path, utt_id, text), ...]}`` from the ``*.trans.txt`` files of a split (sorted)."""
    by_speaker: dict[str, list[tuple[str, str, str]]] = {}
    for trans in sorted(folder.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.partition(" ")
            audio = next(
                (
                    trans.parent / f"{utt_id}{ext}"
                    for ext in (".flac", ".wav")
                    if (trans.parent / f"{utt_id}{ext}").is_file()
                ),
                None,
            )
            if audio is not None:
                by_speaker.setdefault(trans.parent.parent.name, []).append((str(audio), utt_id, text.strip()))
    if not by_speaker:
        raise UserInputError(
            f"--data: {folder} holds no transcribed audio (<spk>/<chap>/*.trans.txt + .flac)"
        )
    return by_speaker


def balanced_subset(
    by_speaker: dict[str, list[tuple[str, str, str]]], seconds: float, seed: int, where: str
) -> list[Clip]:
    """Speakers take turns until ``seconds`` of audio are chosen; durations are read only for chosen clips."""
    rng = random.Random(seed)
    queues = {spk: rng.sample(items, len(items)) for spk, items in sorted(by_speaker.items())}
    order = rng.sample(sorted(queues), len(queues))
    chosen: list[Clip] = []
    total = 0.0
    while total < seconds and any(queues.values()):
        for spk in order:
            if total >= seconds or not queues[spk]:
                continue
            path, utt_id, text = queues[spk].pop()
            duration = soundfile.info(path).duration
            chosen.append(Clip(path, utt_id, spk, text, duration))
            total += duration
    if total < seconds:
        logger.info(
            "%s: %.1f min of audio, less than the %.1f min asked: using it whole",
            where,
            total / 60,
            seconds / 60,
        )
    return sorted(chosen, key=lambda clip: clip.utt_id)
