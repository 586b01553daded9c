"""The paths a run is given: output folders checked before any expensive work, inputs made absolute.

Every path a run stores (``data`` and ``ckpt`` in ``config.yaml``, the length index's entries) is absolute,
so that a resumed run and every rank read the same files from any working directory. A path is resolved
against where it was written: a ``--data``/``--ckpt`` flag or a ``key=value`` override against the working
directory of the command, a path inside a ``--config`` YAML against that YAML's folder (as a manifest's
lines are against the manifest's folder). URLs (``scheme://...``) are kept as they are.

Example::

    >>> check_output_folder(Path("runs/hubert"), "--out")  # doctest: +SKIP
    >>> absolute_path("data/train.tsv", "/work")
    '/work/data/train.tsv'
"""

from __future__ import annotations

import os
from pathlib import Path

from s3prl_laser.errors import UserInputError

PATH_KEYS = ("data", "ckpt")  # config keys that hold a local path (or a URL, kept as is)


def absolute_path(value: str, base: str | os.PathLike | None = None) -> str:
    """``value`` as an absolute, normalised path (``~`` expanded), relative ones taken from ``base``
    (default: the working directory); a URL (``scheme://...``) is returned unchanged. Symlinks are kept."""
    if "://" in value:
        return value
    return os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(value)))


def absolute_paths(values: dict, base: str | os.PathLike | None = None) -> dict:
    """``values`` (config keys) with each string of :data:`PATH_KEYS` made absolute against ``base``."""
    return {
        key: absolute_path(value, base) if key in PATH_KEYS and isinstance(value, str) else value
        for key, value in values.items()
    }


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
