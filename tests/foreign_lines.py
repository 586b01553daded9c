"""What other libraries print and our commands must not show: the test helper of the quiet-screen checks.

``FOREIGN`` matches a line of such chatter: a Python warning (``file.py:12: UserWarning: ...``) or the
``warnings.warn(`` source line printed under one, s3prl's notices about optional upstreams it cannot use,
transformers' progress bars, and what ESPnet's modules print at import (flash-attention, nltk downloads).
``foreign_lines(text)`` lists the lines of ``text`` it matches; ``screen_of(*args)`` runs ``python ARGS`` as a
user runs it and returns what it showed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FOREIGN = re.compile(
    r"\w*Warning: |^\s+warnings\.warn\(|is not installed, cannot use \w+ upstream"
    r"|Writing model shards|Loading weights|Support for mismatched key_padding_mask"
    r"|Failed to import Flash Attention|^\[nltk_data\]"
)


def foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if FOREIGN.search(line)]


def screen_of(*args: str, debug: bool = False) -> str:
    """Run ``python ARGS`` in the repository; assert exit 0; return stdout + stderr.

    ``S3PRL_LASER_LOG`` is unset, or ``debug`` with ``debug=True``; ``PYTHONWARNINGS`` is unset (the screen
    checks see every warning other libraries raise).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("S3PRL_LASER_LOG", "PYTHONWARNINGS")}
    if debug:
        env["S3PRL_LASER_LOG"] = "debug"
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr
