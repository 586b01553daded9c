"""The upstream model layer: the only module that knows s3prl's HuBERT/WavLM internals.

It loads a base model through s3prl's own model classes, freezes it by module name, runs it with the
frozen prefix under ``torch.no_grad()``, and reads/writes checkpoints in s3prl's own formats.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_s3prl_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temp file in the same folder, then ``os.replace``.

    A reader never sees a half-written file, and an interrupted save leaves the old file intact.

    Example:
        >>> save_s3prl_checkpoint({"cfg": {}, "model": {}}, "/tmp/x.pt")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
