"""LASER fine-tuning of HuBERT/WavLM in one command: ``python -m s3prl_laser.finetune``.

This module is the command line: it resolves the config, checks the data before any model is loaded,
then hands over to :mod:`s3prl_laser.training.parts` (upstream + head, loss, optimizer) and
:mod:`s3prl_laser.training.loop` (the loop, checkpoints, resume), and finally exports the tuned upstream.

Examples::

    python -m s3prl_laser.finetune --upstream hubert --data /data/LibriSpeech --out runs/hubert
    python -m s3prl_laser.finetune --upstream wavlm --data clips.txt --out runs/w steps=100 lr=1e-4
    python -m s3prl_laser.finetune --out runs/hubert --resume          # continue a run with its own config
    python -m s3prl_laser.finetune --out runs/hubert --resume steps=5000   # ... and change one key
    torchrun --nproc_per_node 4 -m s3prl_laser.finetune --upstream hubert --data ... --out runs/ddp
    python -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo         # tiny, CPU, < 2 min

Outputs in ``--out``: ``config.yaml`` (resolved), ``checkpoints/step_*.pt`` (training state, resumable),
``checkpoints/best.pt`` (trainable weights at the best validation), ``tb/`` (TensorBoard), and the tuned
upstream in s3prl's own checkpoint format: ``<upstream>_laser.pt`` (last step) and
``<upstream>_laser_best.pt`` (best validation step; see :mod:`s3prl_laser.training.validation`).

One run per ``--out``: a new run into a folder that holds one is refused (continue it with ``--resume``,
or choose another ``--out``); ``--overwrite`` removes that run's files first, and ``--demo`` replaces an
earlier demo run by itself. ``--resume`` continues the run in ``--out`` from its own ``config.yaml``:
``--upstream``, ``--data`` and ``--ckpt`` are not needed again, and a flag, ``--config`` or ``key=value``
changes a key only when given (each change is logged as ``key: old -> new``); a key that would change the
model's shape or which data a step sees is refused (:data:`s3prl_laser.training.config.RESUME_RULES`), and so
is another number of processes. Resuming a finished run says so and exits 0.

Exit status: 0 when done; 2 with a one-line message naming the file or key for a mistake in the config,
data, checkpoint or paths (found before training); 128 + N after signal N (SIGINT, SIGTERM) reached any
process, once every process has saved the step's checkpoint; 1 for a failure during training, whose
process prints its traceback while the others stop at the same step with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from s3prl_laser.stacks import require_python, stack_problem

if TYPE_CHECKING:  # the rest is imported when needed: --help and the environment checks need no torch
    from s3prl_laser.training.config import LaserConfig
    from s3prl_laser.training.ranks import DistEnv

UPSTREAMS = ("hubert", "wavlm")  # s3prl_checkpoint.UPSTREAMS (a torch module), repeated for --help

logger = logging.getLogger("s3prl_laser.finetune")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.finetune",
        description="LASER soft-DTW alignment fine-tuning of a HuBERT/WavLM upstream (s3prl format in/out).",
    )
    parser.add_argument(
        "--upstream", choices=UPSTREAMS, help="base model family (picks the preset; not needed with --resume)"
    )
    parser.add_argument("--config", help="YAML of config keys merged over the upstream's preset")
    parser.add_argument("--data", help="LibriSpeech root, folder of .flac/.wav, or manifest file")
    parser.add_argument(
        "--ckpt",
        help="base upstream: s3prl/fairseq checkpoint, transformers folder or hub id, or an s3prl name "
        "such as wavlm_base_plus (default: s3prl's hubert_base/wavlm_base)",
    )
    parser.add_argument("--out", help="run directory (default: runs/<upstream>_laser)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its config.yaml and newest checkpoint; "
        "flags and key=value change it only when given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one, removing that run's files first",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="tiny bundled model and corpus, then a report (replaces an earlier demo run in --out)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    return parser


def main(argv: list[str] | None = None) -> int:
    require_python("python -m s3prl_laser.finetune")
    args = get_args_parser().parse_args(argv)
    if (problem := stack_problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from s3prl_laser.errors import UserInputError
    from s3prl_laser.training.ranks import PeerFailure, setup_distributed, setup_logging, teardown_distributed

    env = None
    try:
        env = setup_distributed(args.device)
        setup_logging(env)
        return run(args, env)
    except UserInputError as error:  # config, data, checkpoint or path: one line naming it, exit 2
        logger.error("error: %s", error)
        return 2
    except PeerFailure as error:  # another process failed and printed its traceback; this one stops too
        logger.error("error: %s", error)
        return 1
    finally:  # any other exception (a bug) keeps its traceback
        if env is not None:
            teardown_distributed(env)


def run(args: argparse.Namespace, env: DistEnv) -> int:
    """Resolve the config, check the data, train, export; return the exit status."""
    from s3prl_laser.errors import UserInputError
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint
    from s3prl_laser.models.sources import check_source
    from s3prl_laser.training.config import no_op_warnings, resolve_config, resume_config, write_config
    from s3prl_laser.training.heldout import validation_split
    from s3prl_laser.training.length_index import load_or_build_index
    from s3prl_laser.training.loop import TrainState, check_resumable, read_newest_checkpoint, resume, train
    from s3prl_laser.training.parts import build_model, export_best, export_upstream, seeded_head
    from s3prl_laser.training.paths import absolute_paths, check_output_folder, remove_run
    from s3prl_laser.training.ranks import StopSignals, barrier, join_process_group
    from s3prl_laser.training.validation import Validator

    if args.upstream is None and not (args.resume and args.out):
        raise UserInputError("give --upstream (hubert or wavlm), or --resume --out RUN to continue a run")
    if args.resume and args.overwrite:
        raise UserInputError("--overwrite starts a new run and --resume continues one: give only one of them")
    out = Path(args.out or f"runs/{args.upstream}_laser")
    check_output_folder(out, "--out")
    extra = absolute_paths({key: value for key, value in (("data", args.data), ("ckpt", args.ckpt)) if value})
    found = None
    if args.resume:
        cfg, changes = resume_config(out / "config.yaml", args.upstream, args.config, args.overrides, extra)
        for change in changes:
            logger.info("--resume: %s", change)
        done = finished_step(cfg, out)
        if done is not None:
            logger.info("the run in %s already finished (step %d of %d): nothing to do", out, done, cfg.steps)
            return 0
        found = read_newest_checkpoint(out, env)
        if found is not None:
            check_resumable(*found, cfg, env)
    else:
        cfg = resolve_config(args.upstream, args.config, args.overrides, demo=args.demo, extra=extra)
        replace = check_output_claim(out, args.overwrite, args.demo)  # before any rank writes
    join_process_group(env, cfg.dist_timeout_s)
    if not args.resume:
        if replace is not None and env.is_main:
            removed = remove_run(out)
            logger.info("%s: removed the earlier run in %s (%s)", replace, out, ", ".join(removed))
        barrier(env)
        if args.demo:
            cfg = prepare_demo(cfg, out, env)
    for warning in no_op_warnings(cfg):
        logger.warning("%s", warning)
    if cfg.ckpt is not None:
        check_source(cfg.ckpt, "--ckpt")
    if cfg.probe:  # the end-of-run probe needs LibriSpeech's train-clean-100 and dev-clean: say so now
        from s3prl_laser.probe.clips import probe_root
        from s3prl_laser.probe.runner import check_probe_base

        probe_root(cfg.data, "probe=true: data")
        check_probe_base(cfg, out / "probe")  # and a base it can load
    items = load_or_build_index(cfg, out, env)  # data errors come before any model is loaded
    held_out, items, where = validation_split(cfg, items)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    with StopSignals() as stop:
        validator = Validator(cfg, held_out, where, env)
        parts = build_model(cfg, env)
        if args.demo and env.is_main and not Path(cfg.ckpt).is_file():  # a folder or a name: the report
            save_s3prl_checkpoint(parts.base.state_for_s3prl(), _demo_base(cfg, out))  # loads a file
        state = TrainState()
        if args.resume:
            resume(parts, state, cfg, out, env, found)
        train(cfg, parts, items, state, out, env, stop, validator)
    if state.stop_signal is not None:  # agreed by all ranks: every one saved, none exports
        logger.info("stopped by signal %d at step %d; resume with --resume", state.stop_signal, state.step)
        return 128 + state.stop_signal
    if env.is_main:
        final = export_upstream(parts, cfg, out)
        logger.info("tuned upstream written to %s (last step, %d)", final, state.step)
        best = export_best(parts, cfg, out)
        if best is not None:
            logger.info("tuned upstream at the best validation (step %d) written to %s", best[1], best[0])
        probe = None
        if cfg.probe:  # CER of the tuned and the base upstream on the same clips (s3prl_laser.probe)
            from s3prl_laser.probe.runner import probe_tuned_and_base

            probe = probe_tuned_and_base(cfg, final, out / "probe", env.device, show=not args.demo)
        if args.demo:
            from s3prl_laser.training.demo_report import S3prlLastLayer, demo_report

            logger.info("demo report: loading the base and the tuned upstream through s3prl's S3PRLUpstream")
            head = seeded_head(cfg, parts.base.hidden_size)  # the untuned head, as training started
            base = cfg.ckpt if Path(cfg.ckpt).is_file() else _demo_base(cfg, out)
            before = (S3prlLastLayer(f"{cfg.upstream}_local", base).to(env.device), head.to(env.device))
            after = (S3prlLastLayer(f"{cfg.upstream}_laser", final).to(env.device), parts.head)
            demo_report(cfg, before, after, out, tuned_in_memory=parts.base, probe=probe)
    return 0


def check_output_claim(out: Path, overwrite: bool, demo: bool) -> str | None:
    """One run per ``--out``: a new run into a folder that holds one (``config.yaml`` or ``checkpoints/``)
    is refused before anything is written, unless ``overwrite``, or ``demo`` over an earlier demo run (one
    that trained on the bundled demo corpus). Returns why that run is to be replaced (``"--overwrite"`` or
    ``"--demo"``; rank 0 then removes its files, :data:`~s3prl_laser.training.paths.RUN_FILES`), or None.
    Every rank checks before any rank writes."""
    from s3prl_laser.errors import UserInputError
    from s3prl_laser.training.paths import holds_run

    if not holds_run(out):
        return None
    if not (overwrite or (demo and _is_demo_run(out))):
        raise UserInputError(
            f"--out {out} holds a run (config.yaml or checkpoints/): continue it with --resume, or "
            "choose another --out (--overwrite replaces it)"
        )
    return "--overwrite" if overwrite else "--demo"


def _is_demo_run(out: Path) -> bool:
    """Whether the run in ``out`` trained on the bundled demo corpus (replacing it loses nothing of value)."""
    import yaml

    from s3prl_laser.fixtures import demo_corpus_root

    try:
        data = yaml.safe_load((out / "config.yaml").read_text()).get("data")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return data is not None and Path(data).resolve() == demo_corpus_root().resolve()


def finished_step(cfg: LaserConfig, out: Path) -> int | None:
    """The step of ``out``'s newest checkpoint if the run reached ``cfg.steps`` and exported; else None."""
    from s3prl_laser.training import checkpoints as checkpointing

    found = checkpointing.list_checkpoints(out)
    exported = (out / f"{cfg.upstream}_laser.pt").is_file()
    if found and found[-1][0] >= cfg.steps and exported:
        return found[-1][0]
    return None


def _demo_base(cfg: LaserConfig, out: Path) -> Path:
    """Where ``--demo`` keeps the untuned base in s3prl's format when ``--ckpt`` is not a checkpoint file."""
    return out / f"base_{cfg.upstream}.pt"


def prepare_demo(cfg: LaserConfig, out: Path, env: DistEnv) -> LaserConfig:
    """``--demo``: the bundled corpus, and a tiny random-init upstream built into ``out`` (unless given)."""
    from s3prl_laser import fixtures
    from s3prl_laser.training.ranks import barrier

    updates = {}
    if cfg.data is None:
        updates["data"] = str(fixtures.demo_corpus_root())
    if cfg.ckpt is None:
        path = out / f"tiny_{cfg.upstream}.pt"
        if env.is_main and not path.exists():
            fixtures.build_tiny(cfg.upstream, path, seed=cfg.seed)
        barrier(env)
        updates["ckpt"] = str(path)
    return dataclasses.replace(cfg, **updates)


if __name__ == "__main__":
    raise SystemExit(main())
