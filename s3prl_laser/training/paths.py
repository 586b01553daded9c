"""The paths a run is given: output folders checked before any expensive work, inputs made absolute, and
the files a fine-tuning run owns in its ``--out``.

Every path a run stores (``data`` and ``ckpt`` in ``config.yaml``, the length index's entries) is absolute,
so that a resumed run and every rank read the same files from any working directory. A path is resolved
against where it was written: a ``--data``/``--ckpt`` flag or a ``key=value`` override against the working
directory of the command, a path inside a ``--config`` YAML against that YAML's folder (as a manifest's
lines are against the manifest's folder). A ``ckpt`` that exists as a path there is that path; otherwise
URLs (``scheme://...``), hub ids and s3prl names given as ``ckpt`` are kept as they are.

Example::

    >>> check_output_folder(Path("runs/hubert"), "--out")  # doctest: +SKIP
    >>> holds_run(Path("runs/hubert"))  # doctest: +SKIP
    True
    >>> absolute_path("data/train.tsv", "/work")
    '/work/data/train.tsv'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from s3prl_laser.errors import UserInputError
from s3prl_laser.names import UPSTREAMS

# What `python -m s3prl_laser.finetune` writes into --out, and --overwrite removes. The length index
# (data_index.tsv) stays: it is checked against the data on every start, and saves a rescan.
RUN_FILES = (
    "config.yaml", "clips.tsv", "checkpoints", "tb", "demo_report.json", "demo_alignment.png", "probe",
    *(f"{upstream}_laser{suffix}.pt" for upstream in UPSTREAMS for suffix in ("", "_best")),
    *(f"{prefix}_{upstream}.pt" for upstream in UPSTREAMS for prefix in ("tiny", "base")),
)  # fmt: skip


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a fine-tuning run: its ``config.yaml`` or its ``checkpoints/`` folder."""
    return (out / "config.yaml").exists() or (out / "checkpoints").exists()


def remove_run(out: Path) -> list[str]:
    """Remove the run in ``out``: the :data:`RUN_FILES` there (anything else stays). Returns their names."""
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed

PATH_KEYS = ("data", "ckpt")  # config keys that hold a local path (or a URL, kept as is)


def absolute_path(value: str, base: str | os.PathLike | None = None) -> str:
    """``value`` as an absolute, normalised path (``~`` expanded), relative ones taken from ``base``
    (default: the working directory); a URL (``scheme://...``) is returned unchanged. Symlinks are kept."""
    if "://" in value:
        return value
    return os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(value)))


def absolute_paths(values: dict, base: str | os.PathLike | None = None) -> dict:
    """``values`` (config keys) with each string of :data:`PATH_KEYS` made absolute against ``base``
    (default: the working directory). A ``ckpt`` is a path when it exists against ``base`` (``models/wavlm``
    next to the YAML that names it), whatever it looks like; otherwise one that names a download (a URL, an
    s3prl name or a hub id such as ``microsoft/wavlm-base-plus``) is kept as it is."""
    from s3prl_laser.models.sources import is_named_source

    def local(key: str, value) -> bool:
        if key not in PATH_KEYS or not isinstance(value, str):
            return False
        if key != "ckpt" or "://" in value or os.path.exists(absolute_path(value, base)):
            return True
        return not is_named_source(value)

    return {key: absolute_path(value, base) if local(key, value) else value for key, value in values.items()}


def check_output_folder(path: Path, option: str) -> None:
    """Raise ``UserInputError`` naming ``option`` unless ``path`` is a folder, or one that can be created.

    Creates nothing: an existing file at ``path`` or above it, or a folder we may not write in, is refused.
    """
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{option} {path} is an existing file, not a folder; choose another {option}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{option} {path}: {existing} is a file, so the folder cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {path}: no permission to write in {existing}")
