"""The two s3prl stacks ("lanes") this package runs on, and the error shown when neither is installed.

The package itself depends on no s3prl distribution, so that installing it never replaces the one a user
has (PyPI's ``s3prl``, an editable source checkout, or ESPnet's ``espnet-s3prl``, which all provide the
``s3prl`` import). A fresh environment gets a whole lane from one extra (setup.cfg's extras_require).

Example::

    >>> from s3prl_laser.lanes import LANES, missing_s3prl_message
    >>> LANES["current"].install
    "pip install 's3prl-laser[current]'"
    >>> missing_s3prl_message() is None   # s3prl importable here
    True
"""

import importlib.util
from typing import NamedTuple


class Lane(NamedTuple):
    stack: str  # what the extra installs
    install: str  # the one command that installs it


LANES = {
    "current": Lane(
        "ESPnet's s3prl fork (espnet-s3prl) with torch >= 2.9, transformers >= 5, huggingface_hub >= 1",
        "pip install 's3prl-laser[current]'",
    ),
    "classic": Lane(
        "PyPI's s3prl 0.4.18 with torch 2.6-2.8, transformers < 5, huggingface_hub < 1",
        "pip install 's3prl-laser[classic]'",
    ),
}


def missing_s3prl_message() -> str | None:
    """None if ``s3prl`` is importable, else a message naming both lanes' install commands."""
    if importlib.util.find_spec("s3prl") is not None:
        return None
    lines = [f"  {name}: {lane.install}   ({lane.stack})" for name, lane in LANES.items()]
    return "\n".join(
        [
            "s3prl is not installed in this environment (s3prl-laser does not install one itself, so that it "
            "never replaces yours). Install one lane:",
            *lines,
            "From a source tree, use '.[current]' or '.[classic]' instead of 's3prl-laser[...]'.",
        ]
    )
