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
earlier demo run by itself. One process writes a run folder at a time: rank 0 holds a lock on
``OUT/run.lock`` (:mod:`s3prl_laser.training.runlock`), and a second run or ``--resume`` there exits 2 naming
the holder. ``--resume`` continues the run in ``--out`` from its own ``config.yaml``:
``--upstream``, ``--data`` and ``--ckpt`` are not needed again, and a flag, ``--config`` or ``key=value``
changes a key only when given (each change is logged as ``key: old -> new``); a key that would change the
model's shape or which data a step sees is refused (:data:`s3prl_laser.training.config.RESUME_RULES`), and so
is another number of processes. A resumed run trains on the clips it started with (``OUT/clips.tsv``).
Resuming a finished run says so and exits 0; ``steps=N`` beyond its end trains the new steps.

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

from s3prl_laser.names import UPSTREAMS
from s3prl_laser.stacks import require_python, stack_problem

if TYPE_CHECKING:  # the rest is imported when needed: --help and the environment checks need no torch
    from s3prl_laser.training.config import LaserConfig
    from s3prl_laser.training.ranks import DistEnv

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
        "such as wavlm_base_plus or xls_r_300m (default: s3prl's base model of the family)",
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
    from s3prl_laser.training.runlock import release_run_lock

    env, ran = None, False
    try:
        env = setup_distributed(args.device)
        setup_logging(env)
        code = run(args, env)
        ran = True  # every rank returned from run(): they all reach teardown's barrier
        return code
    except UserInputError as error:  # config, data, checkpoint or path: one line naming it, exit 2
        logger.error("error: %s", error)
        return 2
    except PeerFailure as error:  # another process failed and printed its traceback; this one stops too
        logger.error("error: %s", error)
        return 1
    finally:  # any other exception (a bug) keeps its traceback
        release_run_lock()
        if env is not None:
            teardown_distributed(env, wait_for_peers=ran)


@dataclasses.dataclass
class RunPlan:
    """What :func:`resolve_run` settled before any model is loaded: the config, the run folder, the
    checkpoint a resume starts from, the clips (held out and trained on) and whether this is ``--demo``."""

    cfg: LaserConfig
    out: Path
    resume: bool
    demo: bool
    found: tuple[Path, dict] | None
    items: list
    held_out: list
    where: str


def run(args: argparse.Namespace, env: DistEnv) -> int:
    """Resolve the config and check the data, train, then export (and report); return the exit status."""
    plan = resolve_run(args, env)
    if plan is None:
        return 0
    parts, state = train_run(plan, env)
    if state.stop_signal is not None:  # agreed by all ranks: every one saved, none exports
        logger.info("stopped by signal %d at step %d; resume with --resume", state.stop_signal, state.step)
        return 128 + state.stop_signal
    if env.is_main:
        finish_run(plan, parts, state, env)
    return 0


def resolve_run(args: argparse.Namespace, env: DistEnv) -> RunPlan | None:
    """The run's config (new, or resumed from ``--out``), its claim on ``--out``, its source and clips
    checked, ``config.yaml`` written: every user mistake is found here. None when a resumed run already
    finished."""
    from s3prl_laser.models.sources import check_source
    from s3prl_laser.training.config import no_op_warnings, resolve_config, resume_config, write_config
    from s3prl_laser.training.paths import remove_run
    from s3prl_laser.training.ranks import barrier, join_process_group
    from s3prl_laser.training.runlock import take_run_lock

    out, extra = output_and_paths(args)
    if args.resume:
        cfg, changes = resume_config(out / "config.yaml", args.upstream, args.config, args.overrides, extra)
    else:
        cfg = resolve_config(args.upstream, args.config, args.overrides, demo=args.demo, extra=extra)
    join_process_group(env, cfg.dist_timeout_s)
    take_run_lock(out, env)  # one writer per --out: refused on every rank while another run holds it
    found = replace = None
    if args.resume:
        finished, found = resume_point(cfg, changes, out, env)
        if finished:
            return None
    else:
        replace = check_output_claim(out, args.overwrite, args.demo)  # before any rank writes
    if replace is not None and env.is_main:
        removed = remove_run(out)
        logger.info("%s: removed the earlier run in %s (%s)", replace, out, ", ".join(removed))
    barrier(env)
    if args.demo and not args.resume:
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
    clips = run_clips(cfg, out, env, args.resume, found)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    return RunPlan(cfg, out, args.resume, args.demo, found, clips.train, clips.held_out, clips.where)


def output_and_paths(args: argparse.Namespace) -> tuple[Path, dict]:
    """``--out`` (checked) and the paths given as flags (absolute); one line for flags that do not fit."""
    from s3prl_laser.errors import UserInputError
    from s3prl_laser.training.paths import absolute_paths, check_output_folder

    if args.upstream is None and not (args.resume and args.out):
        raise UserInputError(
            "give --upstream (hubert, wavlm, wav2vec2 or data2vec), or --resume --out RUN to continue a run"
        )
    if args.resume and args.overwrite:
        raise UserInputError("--overwrite starts a new run and --resume continues one: give only one of them")
    out = Path(args.out or f"runs/{args.upstream}_laser")
    check_output_folder(out, "--out")
    extra = absolute_paths({key: value for key, value in (("data", args.data), ("ckpt", args.ckpt)) if value})
    return out, extra


def resume_point(cfg: LaserConfig, changes: list[str], out: Path, env: DistEnv):
    """``--resume``, once this run holds ``--out``: the changes given (each logged), then ``(finished,
    found)``: whether the run already finished, and its newest checkpoint (None: none yet), checked against
    the config."""
    from s3prl_laser.training.loop import check_resumable, read_newest_checkpoint

    for change in changes:
        logger.info("--resume: %s", change)
    done = finished_step(cfg, out)
    if done is not None:
        logger.info("the run in %s already finished (step %d of %d): nothing to do", out, done, cfg.steps)
        return True, None
    found = read_newest_checkpoint(out, env)
    if found is not None:
        check_resumable(*found, cfg, env)
    return False, found


def run_clips(cfg: LaserConfig, out: Path, env: DistEnv, resume: bool, found: tuple[Path, dict] | None):
    """The clips the run trains on and validates with: a new run's are the source's, split and kept in
    ``OUT/clips.tsv`` by rank 0; a resumed run's are those it started with (``found``: its newest checkpoint;
    :mod:`s3prl_laser.training.run_clips`). Data errors come here, before any model is loaded."""
    from s3prl_laser.training.config import from_dict
    from s3prl_laser.training.length_index import load_or_build_index
    from s3prl_laser.training.run_clips import new_run_clips, resumed_run_clips, write_run_clips

    items = load_or_build_index(cfg, out, env)
    if not resume:
        clips = new_run_clips(cfg, items)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_run_clips(out, clips)
        return clips
    started = from_dict(found[1]["config"]) if found is not None else cfg
    return resumed_run_clips(cfg, out, items, started, env.is_main)


def train_run(plan: RunPlan, env: DistEnv):
    """Build the model, restore a resumed run's state, and train until ``steps`` or a stop signal; returns
    ``(parts, state)``."""
    from s3prl_laser.training.loop import TrainState, resume, train
    from s3prl_laser.training.parts import build_model
    from s3prl_laser.training.ranks import StopSignals
    from s3prl_laser.training.validation import Validator

    cfg, out = plan.cfg, plan.out
    with StopSignals() as stop:
        validator = Validator(cfg, plan.held_out, plan.where, env)
        parts = build_model(cfg, env)
        if plan.demo:
            keep_demo_base(parts, cfg, out, env)
        state = TrainState()
        if plan.resume:
            resume(parts, state, cfg, out, env, plan.found)
        train(cfg, parts, plan.items, state, out, env, stop, validator)
    return parts, state


def finish_run(plan: RunPlan, parts, state, env: DistEnv) -> None:
    """Rank 0, after the last step: the tuned upstream (last step and best validation) in s3prl's format,
    then the probe if configured, and the ``--demo`` report."""
    from s3prl_laser.training.parts import export_best, export_upstream

    cfg, out = plan.cfg, plan.out
    final = export_upstream(parts, cfg, out)
    logger.info("tuned upstream written to %s (last step, %d)", final, state.step)
    best = export_best(parts, cfg, out)
    if best is not None:
        logger.info("tuned upstream at the best validation (step %d) written to %s", best[1], best[0])
    probe = None
    if cfg.probe:  # CER of the tuned and the base upstream on the same clips (s3prl_laser.probe)
        from s3prl_laser.probe.runner import probe_tuned_and_base

        probe = probe_tuned_and_base(cfg, final, out / "probe", env.device, show=not plan.demo)
    if plan.demo:
        demo_finish(parts, cfg, out, final, env, probe)


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
    from s3prl_laser.training import checkpoints

    found = checkpoints.list_checkpoints(out)
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


def keep_demo_base(parts, cfg: LaserConfig, out: Path, env: DistEnv) -> None:
    """``--demo``: rank 0 keeps the untuned base in s3prl's format for the report, when ``--ckpt`` is a folder
    or a name rather than a checkpoint file (the report loads a file)."""
    from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint

    if env.is_main and not Path(cfg.ckpt).is_file():
        save_s3prl_checkpoint(parts.base.state_for_s3prl(), _demo_base(cfg, out))


def demo_finish(parts, cfg: LaserConfig, out: Path, final: Path, env: DistEnv, probe) -> None:
    """``--demo``: the before/after report of the base and the tuned upstream, loaded through s3prl."""
    from s3prl_laser.training.demo_report import S3prlLastLayer, demo_report
    from s3prl_laser.training.parts import seeded_head

    logger.info("demo report: loading the base and the tuned upstream through s3prl's S3PRLUpstream")
    head = seeded_head(cfg, parts.base.hidden_size)  # the untuned head, as training started
    base = cfg.ckpt if Path(cfg.ckpt).is_file() else _demo_base(cfg, out)
    before = (S3prlLastLayer(f"{cfg.upstream}_local", base).to(env.device), head.to(env.device))
    after = (S3prlLastLayer(f"{cfg.upstream}_laser", final).to(env.device), parts.head)
    demo_report(cfg, before, after, out, tuned_in_memory=parts.base, probe=probe)


if __name__ == "__main__":
    raise SystemExit(main())
