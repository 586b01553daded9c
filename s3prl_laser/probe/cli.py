"""``python -m s3prl_laser.probe``: the probe's command line (heavy imports only once it runs).

Examples::

    python -m s3prl_laser.probe --data /data/LibriSpeech --upstream hubert_laser:runs/h/hubert_laser.pt \\
        --upstream hubert_local:base.pt --out probe/
    python -m s3prl_laser.probe --data ... --upstream ... --lexicon librispeech-lexicon-200k-g2p.txt \\
        --lexicon librispeech-lexicon-allothers-g2p.txt --out probe/

Exit status: 0 when done; 2 with a one-line ``error: ...`` for a mistake in the data, an upstream, a
lexicon or the output folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from s3prl_laser.errors import UserInputError

logger = logging.getLogger("s3prl_laser.probe")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.probe",
        description="CTC probe (CER, PER) on the frozen features of s3prl upstreams, on identical clips.",
    )
    parser.add_argument(
        "--data", required=True, help="LibriSpeech root or its parent (train-clean-100, dev-clean)"
    )
    parser.add_argument(
        "--upstream", action="append", required=True, metavar="NAME[:CKPT]",
        help="an s3prl.hub entry, with its checkpoint; repeat; the first is the table's reference",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for probe.json, probe_layers.png, cache/")
    parser.add_argument(
        "--lexicon", action="append", default=[], help="g2p lexicon (WORD<TAB>PH1 PH2 ...): adds PER; repeat"
    )
    parser.add_argument(
        "--train-hours", type=float, default=1.0, help="training audio of train-clean-100 (default 1)"
    )
    parser.add_argument(
        "--dev-minutes", type=float, default=20.0, help="evaluation audio of dev-clean (default 20)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="head step budget (default 2000)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per head step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="head learning rate (default 2e-3)")
    parser.add_argument(
        "--hidden", type=int, default=0, help="0: linear CTC head; N: one hidden layer of N units"
    )
    parser.add_argument(
        "--eval-every", type=int, default=100, help="dev-slice loss every N steps (default 100)"
    )
    parser.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping"
    )
    parser.add_argument(
        "--no-layer-norm", dest="layer_norm", action="store_false",
        help="sum the layers as they are (s3prl's Featurizer default) instead of each layer-normalised first",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, default=1,
        help="train each head K times (seeds SEED..SEED+K-1) and report the spread (default 1)",
    )  # fmt: skip
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cache", help="feature cache folder (default: OUT/cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from s3prl_laser.stacks import require_python, stack_problem

    require_python("python -m s3prl_laser.probe")  # no torch here: one line, exit 2
    args = get_args_parser().parse_args(argv)
    if (problem := stack_problem()) is not None:  # no s3prl, or a torchaudio that cannot load
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from s3prl_laser.console import setup_console
    from s3prl_laser.probe.runner import ProbeSettings, run_probe

    setup_console(logging.INFO, fmt="%(message)s")
    try:
        for key in ("train_hours", "dev_minutes", "steps", "batch_size", "lr", "eval_every", "patience",
                    "seeds"):  # fmt: skip
            if not getattr(args, key) > 0:
                raise UserInputError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be > 0")
        settings = ProbeSettings(
            data=args.data, upstreams=args.upstream, out=Path(args.out), lexicons=args.lexicon,
            train_hours=args.train_hours, dev_minutes=args.dev_minutes, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, eval_every=args.eval_every,
            patience=args.patience, seed=args.seed, layer_norm=args.layer_norm, seeds=args.seeds,
            device=args.device, cache=Path(args.cache) if args.cache else None,
        )  # fmt: skip
        run_probe(settings)
    except UserInputError as error:
        logger.error("error: %s", error)
        return 2
    return 0
