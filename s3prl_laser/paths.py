"""Checks of the output folders users name on the command line, made before any expensive work.

Example::

    >>> check_output_folder(Path("runs/hubert"), "--out")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from s3prl_laser.errors import UserInputError


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
