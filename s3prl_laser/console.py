"""What a command's screen shows: our own records and real problems; other libraries' chatter at DEBUG.

s3prl logs every model's full config at INFO, warns at import time about optional upstreams whose
packages are absent (``espnet_hubert``, ...), and torch raises ``FutureWarning``/``DeprecationWarning``
for APIs that s3prl's model code uses. None of that is something a user of this package can act on, so:

- records of other libraries' loggers below WARNING are re-labelled DEBUG, and so are warnings that a
  module logs while it is being imported (``funcName == "<module>"``: notices about optional extras);
- Python warnings go through logging (logger ``py.warnings``): developer-facing categories
  (``DEVELOPER_WARNINGS``) raised outside this package at DEBUG, every other warning at WARNING.

Nothing is dropped: ``S3PRL_LASER_LOG=debug`` shows all of it. Our own records (loggers ``s3prl_laser.*``)
and every other library's WARNING/ERROR raised while the command runs stay on screen.

Example::

    >>> setup_console(logging.INFO, fmt="%(levelname)s %(name)s: %(message)s")
"""

import logging
import os
import warnings
from pathlib import Path

OUR_LOGGER = "s3prl_laser"
LEVEL_ENV = "S3PRL_LASER_LOG"  # e.g. S3PRL_LASER_LOG=debug: show other libraries' chatter too
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


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


def show_warning_through_logging(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` replacement: developer-facing warnings from other code at DEBUG."""
    developer_facing = issubclass(category, DEVELOPER_WARNINGS) and not filename.startswith(_PACKAGE_DIR)
    logging.getLogger("py.warnings").log(
        logging.DEBUG if developer_facing else logging.WARNING,
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
