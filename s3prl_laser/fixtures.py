"""Offline fixtures: tiny random-init HuBERT/WavLM/wav2vec 2.0/data2vec checkpoints in s3prl's formats, and
the demo corpus.

The tiny models are built with s3prl's OWN model classes and config dataclasses by
:mod:`s3prl_laser.models.tiny` (see there for the architecture and the formats); this command writes them,
and its module gives the builders' names too (``s3prl_laser.fixtures.build_tiny_hubert``, ...).

Command line (for users and recipes)::

    python -m s3prl_laser.fixtures --hubert tiny_hubert.pt --wavlm tiny_wavlm.pt --wav2vec2 tiny_wav2vec2.pt

Example:
    >>> from s3prl_laser.fixtures import build_tiny_hubert
    >>> path = build_tiny_hubert("/tmp/tiny_hubert.pt", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from s3prl_laser.models.tiny import (  # noqa: F401  (the builders' names, given here too; torch-free)
    build_tiny,
    build_tiny_hubert,
    build_tiny_wavlm,
    tiny_data2vec_state,
    tiny_hubert_state,
    tiny_wav2vec2_state,
    tiny_wavlm_state,
)
from s3prl_laser.stacks import require_python, stack_problem


def demo_corpus_root() -> Path:
    """Path of the bundled demo corpus' ``LibriSpeech`` folder (train-clean-100, dev-clean, test-clean).

    The corpus is synthesised with espeak-ng by ``tools/make_demo_corpus.py`` and installed with the
    package (``s3prl_laser/assets/demo_corpus/``).
    """
    root = Path(str(resources.files("s3prl_laser") / "assets" / "demo_corpus" / "LibriSpeech"))
    if not root.is_dir():
        raise FileNotFoundError(
            f"demo corpus not found at {root}; reinstall the package or run tools/make_demo_corpus.py"
        )
    return root


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.fixtures",
        description="Write tiny random-init HuBERT/WavLM/wav2vec2/data2vec checkpoints in s3prl's formats.",
    )
    parser.add_argument("--hubert", type=Path, help="output path of the tiny HuBERT (converted format)")
    parser.add_argument("--wavlm", type=Path, help="output path of the tiny WavLM (cfg + model)")
    parser.add_argument("--wav2vec2", type=Path, help="output path of the tiny wav2vec 2.0 (converted)")
    parser.add_argument("--data2vec", type=Path, help="output path of the tiny data2vec-audio (converted)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    return parser


def main(argv: list[str] | None = None) -> int:
    require_python("python -m s3prl_laser.fixtures")
    args = get_args_parser().parse_args(argv)
    if (problem := stack_problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    families = {"hubert": "HuBERT", "wavlm": "WavLM", "wav2vec2": "wav2vec 2.0", "data2vec": "data2vec-audio"}
    if all(getattr(args, family) is None for family in families):
        get_args_parser().error("give --hubert, --wavlm, --wav2vec2 and/or --data2vec")
    from s3prl_laser.console import setup_console

    setup_console(logging.INFO, fmt="%(levelname)s %(name)s: %(message)s")  # other libraries' chatter: DEBUG
    for family, title in families.items():
        if (path := getattr(args, family)) is not None:
            print(f"tiny {title}: {build_tiny(family, path, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
