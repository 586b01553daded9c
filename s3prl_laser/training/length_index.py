"""The run's length index: every training clip and its length, found and measured once, then only read.

A start needs each clip's length (for the length buckets and the batch budget): reading ~28.5k file headers
takes seconds on a local disk and minutes on network storage. Rank 0 lists the audio and reads the headers
(in parallel), refuses held-out audio, and writes ``OUT/data_index.tsv``: a manifest with lengths whose first
line records what it was built from and whose last line the number of clips and a checksum of the lines
between, so that an index cut short (a copy stopped half-way, at a line end or inside a line) or edited is
found damaged, reported in one warning and built again. Later starts (``--resume``, a new run in the same
``--out``) and the other ranks read that file instead. It is rebuilt when ``data``, ``data_subsets`` or
``sample_rate`` change, or when a manifest given as ``--data`` changed; new files in a data folder are not
noticed: delete the index to rescan.

Example::

    >>> items = load_or_build_index(cfg, out, env)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from s3prl_laser.data import (
    AudioItem,
    describe_splits,
    find_audio,
    measure_lengths,
    refuse_held_out,
)
from s3prl_laser.errors import UserInputError
from s3prl_laser.training.config import LaserConfig
from s3prl_laser.training.ranks import DistEnv, decided_by_rank0

logger = logging.getLogger("s3prl_laser.finetune")

INDEX_NAME = "data_index.tsv"
_HEADER = "# s3prl_laser length index: "
_TRAILER = "# end of the length index: "


def scan_jobs() -> int:
    """Header reads in flight at once: they wait on storage, so several per CPU (at most 32)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, 4 * cpus)


def index_key(cfg: LaserConfig) -> dict:
    """What an index was built from; an index with another key is stale."""
    source = Path(cfg.data).expanduser().resolve()
    key = {"data": str(source), "data_subsets": list(cfg.data_subsets), "sample_rate": cfg.sample_rate}
    if source.is_file():  # a manifest: its edits make a new index
        stat = source.stat()
        key["manifest"] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return key


def write_index(path: Path, items: list[AudioItem], key: dict) -> None:
    """Write ``path`` (atomically: a temporary file, then a rename) as a manifest with lengths."""
    entries = [f"{item.path}\t{item.num_samples}" for item in items]
    trailer = {"clips": len(entries), "sha256": _checksum(entries)}
    lines = [_HEADER + json.dumps(key), *entries, _TRAILER + json.dumps(trailer)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _checksum(entries: list[str]) -> str:
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def read_index(path: Path, key: dict) -> list[AudioItem] | None:
    """The items of the index at ``path``, or None when there is none, it was built from other data, or it
    is damaged (unreadable, cut short, edited: its last line does not match the lines before; one warning)."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text().splitlines()
        if not lines or not lines[0].startswith(_HEADER) or json.loads(lines[0][len(_HEADER) :]) != key:
            return None
        entries = lines[1:-1]
        if not lines[-1].startswith(_TRAILER):
            raise _Damaged("cut short: it lacks its closing line")
        trailer = json.loads(lines[-1][len(_TRAILER) :])
        if trailer != {"clips": len(entries), "sha256": _checksum(entries)}:
            raise _Damaged(f"{len(entries)} clips and a checksum other than its closing line's: edited")
        items = [AudioItem(entry_path, int(samples)) for entry_path, samples in
                 (entry.rsplit("\t", 1) for entry in entries)]  # fmt: skip
    except (_Damaged, OSError, ValueError, TypeError, AttributeError) as error:  # damaged: scan again
        reason = str(error) if isinstance(error, _Damaged) else f"unreadable: {error.__class__.__name__}"
        logger.warning("data: the length index %s is damaged (%s); reading the lengths again", path, reason)
        return None
    return items


class _Damaged(Exception):
    pass


def scan(cfg: LaserConfig, jobs: int) -> list[AudioItem]:
    """List the training audio, refuse held-out clips, read lengths; ``UserInputError`` on bad data."""
    if cfg.data is None:
        raise UserInputError("no training data: give --data (LibriSpeech root, audio folder or manifest)")
    found = find_audio(cfg.data, cfg.data_subsets)
    if not cfg.allow_held_out_splits:
        refuse_held_out(found, cfg.data)
    items, dropped = measure_lengths(found, cfg.sample_rate, jobs)
    if dropped:
        logger.warning("%d unreadable files skipped while reading lengths", dropped)
    return items


def load_or_build_index(
    cfg: LaserConfig, out: Path, env: DistEnv, jobs: int | None = None
) -> list[AudioItem]:
    """The training clips with lengths: from ``OUT/data_index.tsv`` if it matches ``cfg``, else scanned by
    rank 0 (``jobs`` header reads at once; default :func:`scan_jobs`) and written there. Every rank gets the
    same list; a data error is raised on every rank, before any model is loaded and before ``out`` is
    created."""
    path, key = out / INDEX_NAME, index_key(cfg) if cfg.data is not None else None

    def rank0_items() -> list[AudioItem]:
        items = read_index(path, key) if key is not None else None
        if items is None:
            items = scan(cfg, jobs or scan_jobs())
            out.mkdir(parents=True, exist_ok=True)
            write_index(path, items, key)
            logger.info("data: length index written to %s (delete it to rescan)", path)
        else:
            logger.info("data: lengths read from %s (delete it to rescan)", path)
            if not cfg.allow_held_out_splits:
                refuse_held_out(items, path)
        return items

    # the same one-line data error on every rank
    items = decided_by_rank0(env, f"building the length index {path}", rank0_items)
    if not env.is_main:
        items = read_index(path, key)
        if items is None:
            raise UserInputError(f"{path}: rank 0 wrote this length index but rank {env.rank} cannot read it")
    hours = sum(item.num_samples for item in items) / cfg.sample_rate / 3600
    logger.info("data: %d clips (%.2f h) from %s", len(items), hours, cfg.data)
    logger.info("data by split: %s", describe_splits(items, cfg.sample_rate))
    return items
