"""The clips of a run, fixed when it starts: ``OUT/clips.tsv``.

A new run writes the list of its training clips and of the clips it holds out for validation (path, size in
bytes, length in samples), once, atomically. ``--resume`` trains on that list, whatever the data source holds
now: a manifest that grew or a folder with files added or removed is reported once (counts) and changes no
batch; a clip of the list that is now missing, or of another size (replaced or cut short), stops the resume
with one line naming it. The validation share is part of the list: ``eval_every`` changed on ``--resume``
never moves a clip between training and validation; turning validation on for a run that held nothing out
uses ``dev-clean`` when the source has it (no training clip moves) and is refused otherwise.

Example::

    >>> write_run_clips(out, RunClips(train, held_out, where))  # doctest: +SKIP
    >>> read_run_clips(out).train == train  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from s3prl_laser.data import AudioItem
from s3prl_laser.errors import UserInputError

logger = logging.getLogger("s3prl_laser.finetune")

CLIPS_NAME = "clips.tsv"
_HEADER = "# s3prl_laser run clips: "
TRAIN, HELD_OUT = "train", "held_out"


@dataclass
class RunClips:
    """A run's training clips, its held-out clips and where those come from (the validation's description)."""

    train: list[AudioItem]
    held_out: list[AudioItem]
    where: str
    held_out_from_source: bool = True  # taken out of the data source (not dev-clean beside it)


def clips_path(out: Path) -> Path:
    return Path(out) / CLIPS_NAME


def write_run_clips(out: Path, clips: RunClips) -> Path:
    """Write ``OUT/clips.tsv`` atomically (a temporary file, then a rename): role, bytes, samples (``-``: not
    measured), path."""
    path = clips_path(out)
    header = {"train": len(clips.train), "held_out": len(clips.held_out), "where": clips.where,
              "held_out_from_source": clips.held_out_from_source}  # fmt: skip
    lines = [_HEADER + json.dumps(header)]
    for role, items in ((TRAIN, clips.train), (HELD_OUT, clips.held_out)):
        lines += [f"{role}\t{os.stat(item.path).st_size}\t{_samples(item)}\t{item.path}" for item in items]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _samples(item: AudioItem) -> str:
    """A clip's length in samples, ``-`` when not measured (held-out clips of ``dev-clean``)."""
    return "-" if item.num_samples is None else str(item.num_samples)


def read_run_clips(out: Path) -> tuple[RunClips, dict[str, int]] | None:
    """``(clips, {path: bytes when the run started})`` from ``OUT/clips.tsv``; None when the run has none
    (it started before runs kept one). A damaged file (cut short, edited) is one ``UserInputError``."""
    path = clips_path(out)
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        first, *rows = text.splitlines()
        if not first.startswith(_HEADER) or not text.endswith("\n"):
            raise ValueError("no header or no last line end")
        header = json.loads(first[len(_HEADER) :])
        roles: dict[str, list[AudioItem]] = {TRAIN: [], HELD_OUT: []}
        sizes = {}
        for row in rows:
            role, size, samples, clip = row.split("\t", 3)
            roles[role].append(AudioItem(clip, int(samples) if samples != "-" else None))
            sizes[clip] = int(size)
        if (len(roles[TRAIN]), len(roles[HELD_OUT])) != (header["train"], header["held_out"]):
            raise ValueError("clip counts differ from the header")
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        raise UserInputError(
            f"--resume: {path} is damaged ({error}): it lists the clips this run trains on; restore it from "
            "a copy, or start a new run with another --out"
        ) from None
    from_source = bool(header.get("held_out_from_source", True))
    return RunClips(roles[TRAIN], roles[HELD_OUT], header["where"], from_source), sizes


def check_clips_unchanged(out: Path, sizes: dict[str, int]) -> None:
    """Raise ``UserInputError`` naming the first clip of the run that is missing or has another size now."""
    for clip, size in sizes.items():
        try:
            now = os.stat(clip).st_size
        except OSError:
            raise UserInputError(
                f"--resume: {clip} is missing: it is a clip of this run ({clips_path(out)}); restore it, or "
                "start a new run with another --out"
            ) from None
        if now != size:
            raise UserInputError(
                f"--resume: {clip} is {now} bytes, {size} when the run started ({clips_path(out)}): the run "
                "would train on other audio; restore the file, or start a new run with another --out"
            )


def source_changes(clips: RunClips, current: list[AudioItem]) -> tuple[int, int]:
    """``(added, removed)``: clips the data source holds now that the run does not, and the reverse."""
    ours = {item.path for item in clips.train}
    if clips.held_out_from_source:
        ours |= {item.path for item in clips.held_out}
    theirs = {item.path for item in current}
    return len(theirs - ours), len(ours - theirs)


def new_run_clips(cfg, items: list[AudioItem]) -> RunClips:
    """A new run's clips: :func:`~s3prl_laser.training.heldout.split_held_out` of the source's ``items``."""
    from s3prl_laser.training.heldout import split_held_out

    held_out, train, where = split_held_out(cfg, items)
    return RunClips(train, held_out, where, len(train) < len(items))


def resumed_run_clips(cfg, out: Path, current: list[AudioItem], started, is_main: bool) -> RunClips:
    """The clips a resumed run trains on and validates with: those of ``OUT/clips.tsv``, each checked present
    and of its size; the source's changes since (``current``) are logged once (``is_main``). A run that holds
    none out gets ``dev-clean`` if ``eval_every`` turns validation on and the source has it; otherwise turning
    validation on is refused. A run without a list (from before runs kept one) gets one now, split as it
    started (``started``: the config of its checkpoint)."""
    from s3prl_laser.training.heldout import split_held_out

    found = read_run_clips(out)
    if found is None:
        clips = new_run_clips(started, current)
        sizes = {item.path: os.stat(item.path).st_size for item in clips.train + clips.held_out}
        if is_main:
            write_run_clips(out, clips)
            logger.info("the run's clips written to %s (%d)", clips_path(out), len(clips.train))
    else:
        clips, sizes = found
        check_clips_unchanged(out, sizes)
        added, removed = source_changes(clips, current)
        if (added or removed) and is_main:
            logger.warning(
                "--resume: %s changed since the run started (%d clips added, %d removed); the run trains on "
                "its own %d clips (%s)", cfg.data, added, removed, len(clips.train), clips_path(out),
            )  # fmt: skip
    if cfg.eval_every == 0:
        kept = clips.held_out and clips.held_out_from_source
        kept = f"; {len(clips.held_out)} clips stay held out of training" if kept else ""
        return RunClips(clips.train, [], f"off (eval_every=0){kept}", clips.held_out_from_source)
    if clips.held_out:
        return clips
    held_out, train, where = split_held_out(cfg, clips.train)
    if len(train) == len(clips.train):  # dev-clean beside the source, or too few clips: none moves
        return RunClips(clips.train, held_out, where, False)
    raise UserInputError(
        f"--resume: eval_every={cfg.eval_every}: this run started with validation off and holds no clips out "
        f"of its training data ({clips_path(out)}); validating now would take {len(held_out)} of them out of "
        "training; keep eval_every=0, or start a new run with another --out"
    )
