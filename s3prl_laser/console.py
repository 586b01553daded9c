"""What a command's screen shows: our own records and real problems; other libraries' chatter at DEBUG.

s3prl logs every model's full config at INFO, warns at import time about optional upstreams whose
packages are absent (``espnet_hubert``, ...), and torch raises ``FutureWarning``/``DeprecationWarning``
for APIs that s3prl's model code uses. None of that is something a user of this package can act on, so:

- records of other libraries' loggers below WARNING are re-labelled DEBUG, and so are warnings that a
  module logs while it is being imported (``funcName == "<module>"``: notices about optional extras);
- Python warnings go through logging (logger ``py.warnings``): those raised by other libraries' code
  (torch's "Support for mismatched key_padding_mask and attn_mask is deprecated" under s3prl's WavLM,
  FutureWarnings, ...) at DEBUG, ours at WARNING;
- transformers' progress bars ("Loading weights", "Writing model shards") are off and its records go
  through the same handler (``quiet_transformers``);
- a child process's output (s3prl's runner, in the SUPERB recipes) is shown without the lines
  ``mark_chatter`` recognises: Python warnings and their source lines, optional-extra notices.

Nothing is dropped: ``S3PRL_LASER_LOG=debug`` shows all of it. Our own records (loggers ``s3prl_laser.*``)
and every other library's WARNING/ERROR logged while the command runs stay on screen.

Example::

    >>> setup_console(logging.INFO, fmt="%(levelname)s %(name)s: %(message)s")
"""

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

OUR_LOGGER = "s3prl_laser"
LEVEL_ENV = "S3PRL_LASER_LOG"  # e.g. S3PRL_LASER_LOG=debug: show other libraries' chatter too
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# Lines of another program's output that are chatter: a Python warning ("file.py:12: UserWarning: ...", then
# the source line Python prints under it, indented), s3prl's notices about optional upstreams it cannot use.
_WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")
_NOTICE_LINE = re.compile(r"is not installed, cannot use \w+ upstream")


def _is_ours(logger_name: str) -> bool:
    return logger_name == OUR_LOGGER or logger_name.startswith(OUR_LOGGER + ".")


class ForeignChatterFilter(logging.Filter):
    """Handler filter: other libraries' INFO records and import-time warnings become DEBUG records.

    Handlers test their level before filters run, so the handler keeps level NOTSET and this filter
    applies ``threshold`` after re-labelling.
    """

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        import_time_warning = record.levelno == logging.WARNING and record.funcName == "<module>"
        if not _is_ours(record.name) and (record.levelno < logging.WARNING or import_time_warning):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.threshold


class ProgressAwareHandler(logging.StreamHandler):
    """Writes records above a live tqdm progress bar (``tqdm.write``) instead of through the middle of it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def debug_requested() -> bool:
    """True when ``$S3PRL_LASER_LOG`` asks for DEBUG: show other libraries' chatter too."""
    return os.environ.get(LEVEL_ENV, "").strip().upper() == "DEBUG"


def show_warning_through_logging(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` replacement: other libraries' warnings at DEBUG, ours at WARNING."""
    foreign = not filename.startswith(_PACKAGE_DIR)
    logging.getLogger("py.warnings").log(
        logging.DEBUG if foreign else logging.WARNING,
        "%s:%d: %s: %s",
        filename,
        lineno,
        category.__name__,
        message,
    )


def setup_console(level: int, fmt: str) -> None:
    """Root logging to stderr at ``level`` (``$S3PRL_LASER_LOG`` overrides), chatter filtered as above."""
    requested = os.environ.get(LEVEL_ENV, "")
    named = logging.getLevelName(requested.upper()) if requested else level
    level = named if isinstance(named, int) else level
    root = logging.getLogger()
    if not root.handlers:  # like logging.basicConfig: a program that set up logging keeps its own handlers
        handler = ProgressAwareHandler()
        handler.setFormatter(logging.Formatter(fmt))
        handler.addFilter(ForeignChatterFilter(level))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(OUR_LOGGER).setLevel(level)
    warnings.showwarning = show_warning_through_logging
    if not isinstance(named, int):
        logging.getLogger(__name__).warning(
            "%s=%r is not a logging level (debug, info, warning); using %s",
            LEVEL_ENV, requested, logging.getLevelName(level),
        )  # fmt: skip


@contextlib.contextmanager
def foreign_warnings_at_debug() -> Iterator[None]:
    """Inside the block, warnings go through ``show_warning_through_logging`` (other code's at DEBUG).

    For code that runs in a user's program (the hub entries), where ``setup_console`` is not called; the
    previous warning filters and display are restored on exit.
    """
    with warnings.catch_warnings():
        warnings.showwarning = show_warning_through_logging
        yield


def quiet_transformers() -> None:
    """transformers' progress bars off, its records through the root logger's handler (unless DEBUG)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not debug_requested():
        hf_logging.disable_progress_bar()


def mark_chatter(lines: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """``(line, is_chatter)`` for each line of a child process's output (see the module docstring)."""
    after_warning = False
    for line in lines:
        chatter = bool(_WARNING_LINE.search(line) or _NOTICE_LINE.search(line))
        chatter = chatter or (after_warning and line.startswith("  "))
        after_warning = bool(_WARNING_LINE.search(line))
        yield line, chatter
