"""s3prl-format checkpoint files: the upstream names and keys, a safe reader and an atomic writer.

- :func:`read_checkpoint` reads a checkpoint without executing code from it: ``torch.load(weights_only=True)``
  for s3prl's own formats, the restricted unpickler of :mod:`s3prl_laser.models.fairseq_import` for an
  original fairseq checkpoint. Every checkpoint this package loads goes through it (``--ckpt``, training
  checkpoints on ``--resume``, the ``hubert_laser``/``wavlm_laser`` entries, the export), so a missing,
  damaged or refused file gets the same error everywhere.
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
import zipfile
from pathlib import Path

import torch

from s3prl_laser.errors import DamagedCheckpointError, MissingFileError, UnsafeCheckpointError, UserInputError
from s3prl_laser.models import wav2vec2
from s3prl_laser.models.fairseq_import import restricted_pickle_module

# s3prl's hubert_base / wavlm_base / wav2vec2_base_960 / data2vec_base_960 entries
# (s3prl/upstream/<family>/hubconf.py) download these.
DEFAULT_CKPT_URLS = {
    "hubert": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/hubert_base_ls960.pt",
    "wavlm": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wavlm_base.pt",
    "wav2vec2": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/wav2vec_small.pt",
    "data2vec": "https://huggingface.co/s3prl/converted_ckpts/resolve/main/audio_base_ls.pt",
}
CKPT_KEYS = {
    "hubert": ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"),
    "wavlm": ("cfg", "model"),
    "wav2vec2": wav2vec2.CKPT_KEYS,
    "data2vec": wav2vec2.CKPT_KEYS,
}


def save_s3prl_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temp file in the same folder, then ``os.replace``.

    A reader never sees a half-written file, and an interrupted save leaves the old file intact. The file
    gets the permissions a plain ``open()`` would give it (``0o666`` less the umask: group-readable under
    ``umask 002``), not the ``0o600`` of the temporary file it was written as.

    Example:
        >>> save_s3prl_checkpoint({"cfg": {}, "model": {}}, "/tmp/x.pt")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """This process' umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def read_checkpoint(path: str | os.PathLike, allow_fairseq: bool = True) -> dict:
    """Read a checkpoint without executing code from it; the one reader of every checkpoint we load.

    ``torch.load(weights_only=True)`` first (s3prl's formats, our training checkpoints). If the pickle names
    other globals and ``allow_fairseq`` is set (an original fairseq checkpoint), the restricted unpickler
    of :mod:`s3prl_laser.models.fairseq_import` reads it. A zip checkpoint's CRC-32 checksums are verified
    first, so a file corrupted on disk is not read back as wrong weights.

    Raises (all :class:`~s3prl_laser.errors.UserInputError`, each message naming ``path``):
    ``MissingFileError`` when there is no such file; ``DamagedCheckpointError`` for a truncated, corrupted
    or foreign file; ``UnsafeCheckpointError`` for a pickle naming a global it may not load (nothing of it
    is executed); ``UserInputError`` when it holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise MissingFileError(f"checkpoint {path}: {what}")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"checkpoint {path}: no permission to read it")
    _verify_zip(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Either a pickle that names more than tensors and containers, or a damaged one: the restricted
        # unpickler tells them apart (UnsafeCheckpointError names the global; other errors mean damage).
        state = _read_restricted(path)
        if not allow_fairseq:
            raise UnsafeCheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it is not loaded "
                "(torch.load(weights_only=True) refused it); pass a checkpoint in s3prl's format, e.g. "
                "the one python -m s3prl_laser.finetune writes"
            ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise _damaged(path, error) from None
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    return state


def check_checkpoint_file(path: str | os.PathLike, option: str = "--ckpt") -> Path:
    """Cheap check, before expensive work, that ``path`` can be a checkpoint: it exists, and is a complete
    zip archive (``torch.save``'s format) or a legacy pickle. Full reading is :func:`read_checkpoint`'s job.

    Raises ``MissingFileError`` or ``DamagedCheckpointError`` naming ``option`` and the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise MissingFileError(f"{option} {path}: {what}")
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise _damaged(path, "the zip archive's directory at the end of the file is missing")
    if not head.startswith((b"PK", b"\x80")):  # a zip archive, or a pickle (protocol 2 or later)
        raise _damaged(path, "empty" if not head else "not a PyTorch checkpoint")
    return path


def _verify_zip(path: Path) -> None:
    """Check the CRC-32 of every member of a zip checkpoint (``torch.save``'s format); others pass."""
    if not zipfile.is_zipfile(path):
        return  # a truncated zip has lost its directory: torch.load then fails, and says so
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise _damaged(path, error) from None
    if bad is not None:
        raise _damaged(path, f"checksum mismatch in {bad}")


def _read_restricted(path: Path) -> dict:
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module()
        )  # weights_only=False is what lets torch use our pickle_module; its find_class is the whitelist
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{path}: {error}") from None
    except Exception as error:  # whatever a damaged pickle makes the unpickler raise
        raise _damaged(path, error) from None


def _damaged(path: Path, reason: object) -> DamagedCheckpointError:
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return DamagedCheckpointError(path, text.split(". ")[0])  # torch adds advice on its internals after


def check_keys(upstream: str, state: dict, where: str) -> None:
    expected = CKPT_KEYS[upstream]
    missing = [k for k in expected if k not in state]
    found = wav2vec2.family_of(state)
    if missing or found != upstream:
        hint = f" (it looks like a {found} checkpoint; pass --upstream {found})" if found else ""
        raise UserInputError(
            f"{where} is not an s3prl {upstream} checkpoint{hint}: expected keys {list(expected)}, "
            f"found {sorted(state)}"
        )
