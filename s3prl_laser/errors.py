"""The exceptions that mean "the user gave something wrong", as opposed to a bug.

A :class:`UserInputError` names the file, path or config key at fault and says what to do; the command
lines (``python -m s3prl_laser.finetune``, ``python -m s3prl_laser.export``) print its message as one line
and exit with status 2, while any other exception keeps its traceback. Each class also derives from the
built-in exception that callers caught before (``ValueError``, and ``FileNotFoundError`` or
``pickle.UnpicklingError`` where those apply), so library code that catches those keeps working.

Example::

    >>> try:
    ...     raise UserInputError("--config run.yaml: no such file")
    ... except ValueError as error:
    ...     print(error)
    --config run.yaml: no such file
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path


class UserInputError(ValueError):
    """A mistake in a config, a data path, a checkpoint or an output path; the message names it."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file the user named (or a default location) does not exist."""


class DamagedCheckpointError(UserInputError):
    """A checkpoint file exists but cannot be read: truncated, corrupted on disk, or not a checkpoint.

    ``path``: the file; ``reason``: what is wrong with it, in a few words.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"checkpoint {path} is damaged ({reason}): it may be truncated (an interrupted download or "
            "copy) or corrupted on disk; download it or produce it again"
        )


class UnsafeCheckpointError(UserInputError, pickle.UnpicklingError):
    """A checkpoint pickle names a global outside the reader's whitelist; nothing of it was executed."""
