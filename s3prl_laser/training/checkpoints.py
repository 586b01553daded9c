"""Training checkpoints: one plain dict per file, written atomically, loaded with ``weights_only=True``.

A checkpoint (nanoGPT style) holds::

    {"model": {name: tensor} (trainable upstream parameters only), "head": head state_dict,
     "optimizer": ..., "scheduler": ..., "step": int, "config": dict, "rng": [per-rank RNG states],
     "data_position": {"epoch": int, "batch": int}, "counters": {reason: int}, "world_size": int}

Files are ``OUT/checkpoints/step_0000500.pt``; the newest ``keep`` files are kept. Beside them,
``OUT/checkpoints/best.pt`` holds the trainable weights and head at the best validation so far
(``{"model", "head", "step", "metrics", "config"}``). A damaged ``best.pt`` never stops a run: it is set
aside as ``best.pt.damaged`` (:func:`read_best`) and the run keeps a new best from its next validation.

Example::

    >>> save_checkpoint(state, out_dir, step=500)          # doctest: +SKIP
    >>> state = load_checkpoint(latest_checkpoint(out_dir))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from s3prl_laser.errors import DamagedCheckpointError, UserInputError
from s3prl_laser.models.s3prl_format import read_checkpoint, save_s3prl_checkpoint

logger = logging.getLogger("s3prl_laser.finetune")

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out) / f"step_{step:07d}.pt"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's training checkpoints, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, out: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write ``state`` atomically (temp file + rename) as step ``step``; keep only the newest ``keep``."""
    path = save_s3prl_checkpoint(state, checkpoint_path(out, step))
    for _, old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def best_path(out: str | os.PathLike) -> Path:
    return checkpoint_dir(out) / "best.pt"


def save_best(state: dict, out: str | os.PathLike) -> Path:
    """Write ``state`` atomically as the run's best checkpoint (replacing the previous best)."""
    return save_s3prl_checkpoint(state, best_path(out))


BEST_KEYS = ("model", "head", "step")


def read_best(out: str | os.PathLike) -> dict | None:
    """The run's best checkpoint; None if there is none, or if it is damaged (rank 0 only: it renames).

    A damaged ``best.pt`` (truncated, corrupted, not a best checkpoint) is reported in one warning and
    renamed to ``best.pt.damaged``, as a damaged training checkpoint is, so that nothing reads it again.
    """
    path = best_path(out)
    if not path.is_file():
        return None
    try:
        best = load_checkpoint(path)
        if missing := [key for key in BEST_KEYS if key not in best]:
            raise DamagedCheckpointError(path, f"lacks {missing}: not a best checkpoint")
    except UserInputError as error:
        reason = error.reason if isinstance(error, DamagedCheckpointError) else str(error)
        path.replace(path.with_name(path.name + ".damaged"))
        logger.warning(
            "%s is damaged (%s): renamed to %s.damaged; the best checkpoint is kept anew from the next "
            "validation", path, reason, path.name,
        )  # fmt: skip
        return None
    return best


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint on the CPU without executing code (``weights_only=True``).

    Raises ``DamagedCheckpointError`` naming the file when it is truncated or corrupted.
    """
    return read_checkpoint(path, allow_fairseq=False)


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """This process' RNG states as tensors (CPU generator, and the CUDA one of ``device`` if any)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
