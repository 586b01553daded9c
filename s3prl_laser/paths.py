"""Checks of the output folders users name on the command line, made before any expensive work, and the
files a fine-tuning run owns in its ``--out``.

Example::

    >>> check_output_folder(Path("runs/hubert"), "--out")  # doctest: +SKIP
    >>> holds_run(Path("runs/hubert"))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from s3prl_laser.errors import UserInputError
from s3prl_laser.s3prl_checkpoint import UPSTREAMS

# What `python -m s3prl_laser.finetune` writes into --out, and --overwrite removes. The length index
# (data_index.tsv) stays: it is checked against the data on every start, and saves a rescan.
RUN_FILES = (
    "config.yaml", "checkpoints", "tb", "demo_report.json", "demo_alignment.png",
    *(f"{upstream}_laser{suffix}.pt" for upstream in UPSTREAMS for suffix in ("", "_best")),
    *(f"tiny_{upstream}.pt" for upstream in UPSTREAMS),
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
