"""The recipes' first check: this Python must have s3prl-laser and what the recipe imports (one line, exit 2).

The scripts of this folder run from a source tree with whatever ``python`` the user typed, which may not be
the one s3prl-laser is installed in; then nothing of ours can be imported yet, so this module uses the
standard library only.

Example::

    >>> require_modules("superb.py", ("yaml", "soundfile"))   # returns, or exits 2 with one line
"""

import importlib.util
import sys


def require_modules(script: str, modules: tuple[str, ...]) -> None:
    """Exit 2 with one line naming what is missing and the environment to use, if anything is missing."""
    missing = [name for name in ("s3prl_laser", *modules) if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: {script} needs {', '.join(missing)}, which {sys.executable} does not have: activate the "
            "environment s3prl-laser is installed in (e.g. source .venv/bin/activate), or set PYTHON and "
            "use superb_asr.sh / superb_pr.sh",
            file=sys.stderr,
        )
        raise SystemExit(2)
