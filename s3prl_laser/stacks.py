"""The s3prl stacks ("lanes") this package runs on; the one-line errors of environments that cannot run it.

The package itself depends on no s3prl distribution, so that installing it never replaces the one a user
has (PyPI's ``s3prl``, an editable source checkout, or ESPnet's ``espnet-s3prl``, which all provide the
``s3prl`` import). A fresh environment gets a whole lane from one extra (setup.cfg's extras_require).

Every command checks its interpreter before anything heavy is imported (``require_python``: no torch here,
so activate the environment or install), and, once its arguments are parsed, the s3prl stack
(``stack_problem``: no s3prl, or a torchaudio whose C library cannot load with the installed torch).
torchaudio's library is built for one torch release, pip does not check that, and ``import torchaudio``
then raises ``OSError``, which breaks s3prl and anything else that imports it.

Example::

    >>> from s3prl_laser.stacks import LANES, missing_s3prl_message
    >>> LANES["current"].install
    "pip install 's3prl-laser[current]'"
    >>> missing_s3prl_message() is None   # s3prl importable here
    True
"""

import importlib.util
import sys
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


# torch release (major.minor) -> the torchaudio whose C library loads with it. torchaudio 2.N is built for
# torch 2.N up to 2.10; measured here: torchaudio 2.11.0 loads with torch 2.11.0, 2.12.1 and 2.14.1, while
# 2.11.1 (the last release) loads with torch 2.14.1 only, and 2.10.0 not with torch 2.12.1.
TORCHAUDIO_FOR_TORCH = {f"2.{n}": f"2.{n}.*" for n in range(6, 11)} | {
    "2.11": "2.11.0",
    "2.12": "2.11.0",
    "2.14": "2.11.0",
}
# What the commands import at their top level or first thing (module names).
RUNTIME_MODULES = ("torch", "yaml", "soundfile", "numpy")


def require_python(command: str, modules: tuple[str, ...] = RUNTIME_MODULES) -> None:
    """Exit 2 with one line if this interpreter lacks ``modules`` (not imported: only looked up, fast)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: {command} needs {', '.join(missing)}, which {sys.executable} does not have: activate "
            "the environment s3prl-laser is installed in (e.g. source .venv/bin/activate), or install it "
            f"with {LANES['current'].install}",
            file=sys.stderr,
        )
        raise SystemExit(2)


def torchaudio_problem() -> str | None:
    """None if torchaudio is absent or imports; else what is installed, the pairs that work and the fix.

    Imports torchaudio (and so torch): call it after the arguments are parsed, not before ``--help``.
    """
    if importlib.util.find_spec("torchaudio") is None:
        return None
    try:
        import torchaudio  # noqa: F401
    except Exception as error:  # OSError (library built for another torch), ImportError, AttributeError
        return torchaudio_message(error)
    return None


def torchaudio_message(error: BaseException) -> str:
    """The error for a torchaudio that cannot load: what is installed, the pairs that work, the fix."""
    torch_version, audio_version = _version("torch"), _version("torchaudio")
    pairs = ", ".join(f"torch {t} + torchaudio {a}" for t, a in TORCHAUDIO_FOR_TORCH.items())
    requirement = torchaudio_requirement(torch_version)
    if requirement is not None:
        fix = f'pip install "{requirement}"'
    else:  # no torchaudio known to load with this torch; s3prl.hub imports torchaudio, so torch has to move
        fix = f'pip install "torch==2.14.*" "{torchaudio_requirement("2.14")}"'
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"torchaudio {audio_version} cannot be imported with torch {torch_version} ({type(error).__name__}: "
        f"{reason}). torchaudio's C library is built for one torch release; pairs that work: {pairs}. "
        f"Fix: {fix}"
    )


def torchaudio_requirement(torch_version: str) -> str | None:
    """The pip requirement of the torchaudio that loads with ``torch_version`` (e.g. "2.12.1+cu130"), or None.

    Example::

        >>> torchaudio_requirement("2.12.1")
        'torchaudio==2.11.0'
    """
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return f"torchaudio=={TORCHAUDIO_FOR_TORCH[minor]}" if minor in TORCHAUDIO_FOR_TORCH else None


def stack_problem() -> str | None:
    """The error shown before a command's work if the s3prl stack cannot run (no s3prl, broken torchaudio)."""
    return missing_s3prl_message() or torchaudio_problem()


def _version(distribution: str) -> str:
    import importlib.metadata  # not at the top: about 0.1 s, and --help does not need it

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
