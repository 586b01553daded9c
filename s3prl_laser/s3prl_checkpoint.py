"""s3prl-format checkpoint files: the upstream names and keys, a safe reader and an atomic writer.

- :func:`read_checkpoint` reads a checkpoint without executing code from it: ``torch.load(weights_only=True)``
  for s3prl's own formats, the restricted unpickler of :mod:`s3prl_laser.fairseq_checkpoint` for an
  original fairseq checkpoint.
- :func:`check_keys` says which format a checkpoint dict is in when it is not the expected one.
- :func:`save_s3prl_checkpoint` writes a checkpoint atomically.

Example:
    >>> state = read_checkpoint("tiny_hubert.pt")  # doctest: +SKIP
    >>> check_keys("hubert", state, "tiny_hubert.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from s3prl_laser.fairseq_checkpoint import restricted_pickle_module

UPSTREAMS = ("hubert", "wavlm")
# s3prl's hubert_base / wavlm_base entries (s3prl/upstream/{hubert,wavlm}/hubconf.py) download these.
DEFAULT_CKPT_URLS = {
    "hubert": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/hubert_base_ls960.pt",
    "wavlm": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wavlm_base.pt",
}
CKPT_KEYS = {
    "hubert": ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"),
    "wavlm": ("cfg", "model"),
}


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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint without executing code from it.

    ``torch.load(weights_only=True)`` first (s3prl formats); if the pickle names other globals (an
    original fairseq checkpoint), the restricted unpickler reads it: see
    :class:`~s3prl_laser.fairseq_checkpoint.RestrictedUnpickler`.
    Raises ``FileNotFoundError`` naming the path, ``fairseq_checkpoint.UnsafeCheckpointError`` for a
    forbidden global.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=False is what lets torch use our pickle_module; its find_class is the whitelist.
        state = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module()
        )
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    return state


def check_keys(upstream: str, state: dict, where: str) -> None:
    expected = CKPT_KEYS[upstream]
    missing = [k for k in expected if k not in state]
    if missing:
        other = next((u for u in UPSTREAMS if u != upstream and all(k in state for k in CKPT_KEYS[u])), None)
        hint = f" (it looks like a {other} checkpoint)" if other else ""
        raise ValueError(
            f"{where} is not an s3prl {upstream} checkpoint{hint}: expected keys {list(expected)}, "
            f"found {sorted(state)}"
        )
