"""SUPERB ASR and PR with s3prl's own, unchanged ``run_downstream``: prepare, train, evaluate, result.json.

``superb_asr.sh`` and ``superb_pr.sh`` call ``python superb.py asr|pr ARGS``. Steps:

1. prepare what s3prl needs: ASR: bucket CSVs of the LibriSpeech splits and a resolved copy of
   ``configs/asr.yaml`` (SUPERB's settings, with our ``configs/char.dict``); PR: a resolved copy of the
   s3prl checkout's ``downstream/ctc/libriphone.yaml`` with the paper's lr 5e-4, absolute lexicon and
   vocabulary paths and the corpus location. ``--steps N`` sets ``total_steps`` and scales the log,
   eval and save intervals by the same factor (at least 1); ``--set KEY=VALUE`` then overrides any
   existing config key, after ``--smoke`` (a tiny downstream for checking the pipeline on a CPU).
2. ``python -m s3prl.run_downstream -m train -u NAME -k CKPT -d asr|ctc -c CONFIG -p OUT/exp``.
3. ``python -m s3prl.run_downstream -m evaluate -t test-clean|test -e OUT/exp/<best or last>.ckpt``
   with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in that command's environment only: s3prl's runner
   checkpoints hold an ``argparse.Namespace``, which torch >= 2.6 refuses to unpickle by default.
   (Upstream checkpoints loaded by ``hubert_laser``/``wavlm_laser`` are still read weights-only.)
4. parse s3prl's printed metric into ``OUT/result.json`` = ``{"task", "upstream", "metric", "value"}``,
   ``value`` in percent (s3prl prints PER as a fraction; it is multiplied by 100).

s3prl's packages lack PR's recipe files (ctc corpus modules, libriphone.yaml, lexicons, vocabulary); PR
therefore needs ``--s3prl-src`` naming an s3prl source checkout (v0.4.18 on every lane), whose code then
runs (``PYTHONPATH``). Before training, one line and exit 2 if: a file PR needs is missing (``--lexicon`` /
``--vocab`` replace the yaml's), the tree's PR modules do not import on this stack, or a lexicon phone is
not in the vocabulary or a transcript word in no lexicon.

Example::

    python downstream_recipes/superb.py asr --upstream hubert_laser --ckpt runs/demo/hubert_laser.pt \\
        --librispeech /data/LibriSpeech --out runs/superb_asr --steps 4 --device cpu
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from recipe_env import require_modules  # this script's folder

require_modules("downstream_recipes/superb.py", ("yaml", "soundfile", "s3prl"))

import yaml  # noqa: E402
from prepare_librispeech import (  # noqa: E402
    chapter_dirs,
    check_characters,
    read_transcripts,
    write_bucket_csvs,
    write_word_csv,
)

from s3prl_laser.console import debug_requested, mark_chatter  # noqa: E402

RECIPES = Path(__file__).resolve().parent
PR_RECIPE = Path("downstream", "ctc", "libriphone.yaml")  # SUPERB PR's config in an s3prl source tree
PR_LR = 5.0e-4  # LASER's authors' PR learning rate (libriphone.yaml's 1e-2 is too high)
SPLITS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
# --smoke: check the pipeline in a minute on a CPU, not for numbers. SUPERB's ASR downstream (2 x 1024
# BiLSTM) takes minutes per step on 2 cores; smoke runs use one 16-unit LSTM layer, read audio in the
# main process and evaluate dev once, at the last step. PR's libriphone downstream is already linear.
SMOKE = {
    "asr": [
        "downstream_expert.modelrc.project_dim=16",
        "downstream_expert.modelrc.RNNs.dim=[16]",
        "downstream_expert.modelrc.RNNs.dropout=[0.2]",
        "downstream_expert.modelrc.RNNs.layer_norm=[false]",
        "downstream_expert.modelrc.RNNs.proj=[false]",
        "downstream_expert.modelrc.RNNs.sample_rate=[1]",
        "downstream_expert.datarc.num_workers=0",
        "downstream_expert.datarc.batch_size=8",
    ],
    "pr": ["downstream_expert.corpus.num_workers=0"],
}


PR_TREE_VERSION = "0.4.18"  # the s3prl source tree the PR recipe is tested with, on every lane


def s3prl_source_howto() -> str:
    """How to get the s3prl source tree SUPERB PR runs from: the same on every lane (docs/recipes.md)."""
    return (
        f"get s3prl's v{PR_TREE_VERSION} source tree "
        f"(git clone https://github.com/s3prl/s3prl.git s3prl-src && git -C s3prl-src checkout "
        f"v{PR_TREE_VERSION}) and pass --s3prl-src s3prl-src"
    )


@dataclass(frozen=True)
class Task:
    """One SUPERB task as s3prl runs it."""

    name: str  # SUPERB's name, written to result.json
    downstream: str  # run_downstream -d
    metric: str  # result.json's metric name
    test_split: str  # run_downstream -m evaluate -t
    printed_metric: str  # key s3prl prints as "<split> <key>: <value>"
    to_percent: float  # factor from s3prl's printed value to percent


TASKS = {
    "asr": Task("ASR", "asr", "WER", "test-clean", "wer", 1.0),
    "pr": Task("PR", "ctc", "PER", "test", "per", 100.0),
}


def get_args_parser(task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"superb_{task}.sh",
        description=f"SUPERB {TASKS[task].name} with s3prl's run_downstream: train, then test on test-clean.",
    )
    parser.add_argument("--upstream", required=True, help="s3prl upstream name (-u), e.g. hubert_laser")
    parser.add_argument(
        "--ckpt",
        type=Path,
        help="upstream checkpoint (-k); hubert_laser/wavlm_laser default to $S3PRL_LASER_HOME/<name>.pt",
    )
    parser.add_argument("--librispeech", required=True, type=Path, help="LibriSpeech root holding the splits")
    parser.add_argument("--out", required=True, type=Path, help="output folder (configs, exp/, result.json)")
    parser.add_argument("--steps", type=int, help="total training steps (default: SUPERB's); intervals scale")
    parser.add_argument("--s3prl-src", type=Path, help="s3prl source checkout to run (needed for PR)")
    if task == "pr":
        parser.add_argument(
            "--lexicon",
            type=Path,
            action="append",
            help="word -> phones lexicon (s3prl's g2p format) instead of libriphone.yaml's; repeatable, the "
            "first entry of a word wins",
        )
        parser.add_argument(
            "--vocab", type=Path, help="phone list (one a line) instead of libriphone.yaml's vocabulary"
        )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an existing key of the resolved s3prl config, applied last; dotted KEY, YAML VALUE "
        "(e.g. --set downstream_expert.modelrc.project_dim=256); repeatable",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="pipeline check: tiny downstream, dev evaluated once (SMOKE in superb.py); no real numbers",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="run_downstream --device; auto = cuda when torch sees one, else cpu",
    )
    return parser


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
    return requested


def scale_runner(runner: dict, steps: int | None) -> dict:
    """``runner`` with ``total_steps = steps`` and log/eval/save intervals scaled alike (each >= 1)."""
    if steps is None:
        return dict(runner)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    factor = steps / runner["total_steps"]
    scaled = {key: max(1, round(runner[key] * factor)) for key in ("log_step", "eval_step", "save_step")}
    return {**runner, **scaled, "total_steps": steps}


def s3prl_tree(src: Path | None) -> Path:
    """The folder of the s3prl package to run: ``SRC/s3prl`` of a checkout, else the installed package."""
    if src is None:
        return Path(importlib.util.find_spec("s3prl").origin).parent
    tree = src.resolve() / "s3prl"
    if not (tree / "run_downstream.py").is_file():
        raise ValueError(
            f"--s3prl-src {src}: {tree / 'run_downstream.py'} not found; pass the checkout's root"
        )
    return tree


def asr_config(args, out: Path) -> Path:
    """Bucket CSVs and the resolved SUPERB ASR config in ``out``; returns the config path."""
    config = yaml.safe_load((RECIPES / "configs" / "asr.yaml").read_text())
    dict_path = RECIPES / "configs" / "char.dict"
    splits = list(SPLITS.values())
    check_characters(args.librispeech, splits, dict_path)
    datarc = config["downstream_expert"]["datarc"]
    datarc["libri_root"] = str(args.librispeech.resolve())
    datarc["bucket_file"] = str(write_bucket_csvs(args.librispeech, splits, out / "len_for_bucket").resolve())
    datarc["dict_path"] = str(dict_path)
    datarc["num_workers"] = min(datarc["num_workers"], os.cpu_count() or 1)
    config["runner"] = scale_runner(config["runner"], args.steps)
    return write_yaml(apply_overrides(config, overrides(args, "asr", config)), out / "asr.yaml")


# What ``-d ctc`` with libriphone.yaml runs from the tree, besides the files the yaml names.
PR_CODE = [
    Path("run_downstream.py"),
    Path("downstream", "runner.py"),
    *(Path("downstream", "ctc", f"{name}.py") for name in ("expert", "data", "metric", "text")),
    Path("downstream", "ctc", "corpus", "libriphone.py"),  # no __init__.py: packaging drops it
]
# Modules the runner imports for PR, in the order it imports them (import errors come from the first).
PR_MODULES = ["s3prl.hub", "s3prl.downstream.runner", "s3prl.downstream.ctc.expert",
              "s3prl.downstream.ctc.corpus.libriphone"]  # fmt: skip


def pr_recipe(args, tree: Path) -> dict:
    """The s3prl tree's libriphone.yaml with absolute lexicon and vocabulary paths (``--lexicon`` /
    ``--vocab`` when given, else the yaml's, in the tree), once every file SUPERB PR needs is found;
    else ``ValueError`` listing the missing ones and how to get an s3prl source checkout."""
    for flag, path in [*(("--lexicon", path) for path in args.lexicon or []), ("--vocab", args.vocab)]:
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    base = tree / PR_RECIPE
    missing = [tree / path for path in [PR_RECIPE, *PR_CODE] if not (tree / path).is_file()]
    config = yaml.safe_load(base.read_text()) if base.is_file() else None
    if config is not None:
        expert = config["downstream_expert"]
        lexicons = args.lexicon or [tree / path for path in expert["corpus"]["lexicon"]]
        vocab = args.vocab or tree / expert["text"]["vocab_file"]
        missing += [path for path in [*lexicons, vocab] if not path.is_file()]
        expert["corpus"]["lexicon"] = [str(Path(path).resolve()) for path in lexicons]
        expert["text"]["vocab_file"] = str(Path(vocab).resolve())
    if missing:
        listed = ", ".join(str(path) for path in missing)
        origin = (
            f"--s3prl-src {args.s3prl_src}"
            if args.s3prl_src
            else "the installed s3prl package (its wheel and sdist ship no recipe files)"
        )
        only_lexicons = all(path.parent.name == "lexicon" for path in missing)
        fix = s3prl_source_howto()
        if only_lexicons:
            fix = "pass --lexicon FILE, a lexicon that covers the corpus"
        raise ValueError(f"SUPERB PR needs s3prl's recipe files, missing from {origin}: {listed}; {fix}")
    return config


def check_lexicons(librispeech: Path, lexicons: list[str], vocab: str) -> None:
    """``ValueError`` (one line) unless every lexicon phone is in ``vocab`` and every transcript word of the
    PR splits has a pronunciation: s3prl's libriphone corpus would stop on either with a bare assertion or
    ``KeyError``, after the upstream is loaded."""
    phones = {line.strip() for line in Path(vocab).read_text().splitlines() if line.strip()}
    words = set()
    for lexicon in lexicons:
        for number, line in enumerate(Path(lexicon).read_text().splitlines(), start=1):
            if not line.strip():
                raise ValueError(f"{lexicon}:{number}: empty line (s3prl's libriphone corpus stops on it)")
            word, *pronunciation = line.split()
            unknown = [phone for phone in pronunciation if phone not in phones]
            if unknown:
                raise ValueError(
                    f"{lexicon}:{number}: phone {unknown[0]!r} of {word!r} is not in the vocabulary {vocab}; "
                    "pass --vocab with a phone list (one a line) that has every phone of the lexicons"
                )
            words.add(word)
    for split in SPLITS.values():
        for chapter in chapter_dirs(librispeech, split):
            for words_of_utterance in read_transcripts(chapter).values():
                unknown = [word for word in words_of_utterance.split() if word not in words]
                if unknown:
                    raise ValueError(
                        f"{chapter}: the word {unknown[0]!r} is in no lexicon ({', '.join(lexicons)}); "
                        "pass --lexicon with a lexicon that covers the corpus (s3prl's g2p format)"
                    )


def check_tree_imports(tree: Path, modules: list[str]) -> None:
    """Import ``modules`` (for PR: ``PR_MODULES``, what ``-d ctc`` runs) from ``tree`` in this process, as
    the runner will; ``ValueError`` (one line: the module, the error, the fix) if the tree cannot run on
    this stack.

    The tree's ``s3prl`` goes first on ``sys.path``, so it shadows the installed distribution here as it
    does in the runner (``PYTHONPATH``); the start-up hook registers ``hubert_laser``/``wavlm_laser`` into
    whichever ``s3prl.hub`` is imported, and fills the same library gaps.
    """
    import contextlib
    import importlib
    import io
    import logging

    sys.path.insert(0, str(tree.parent))
    printed = io.StringIO()
    for name in modules:
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                importlib.import_module(name)
        except Exception as error:  # anything the tree's import raises: this stack cannot run it
            logging.getLogger(__name__).debug("import %s printed: %s", name, printed.getvalue())
            if isinstance(error, ModuleNotFoundError) and (error.name or "s3prl").split(".")[0] != "s3prl":
                fix = f"install it into this environment (pip install {error.name.split('.')[0]})"
            else:
                fix = "use the s3prl tree docs/recipes.md names for this lane"
            raise ValueError(
                f"--s3prl-src {tree.parent}: the tree cannot run on this stack: importing {name} fails with "
                f"{type(error).__name__}: {error}; {fix}"
            ) from None
    found = Path(sys.modules["s3prl"].__file__).parent
    if found.resolve() != tree:
        raise ValueError(f"--s3prl-src {tree.parent}: python imported s3prl from {found}, not from {tree}")


def pr_config(args, out: Path, tree: Path, config: dict) -> Path:
    """``config`` (``pr_recipe``'s libriphone.yaml) resolved for this corpus and the paper's lr, written to
    ``out``; returns its path."""
    expert = config["downstream_expert"]
    corpus = expert["corpus"]
    if "csv_dir" in corpus:  # newer checkouts: wav_path/transcription tables per split
        for key, split in SPLITS.items():
            write_word_csv(args.librispeech, split, out / "superb_pr" / corpus[key])
        corpus["csv_dir"] = str((out / "superb_pr").resolve())
    elif "path" in corpus:  # older checkouts: the LibriSpeech root itself
        corpus["path"] = str(args.librispeech.resolve())
    else:
        raise ValueError(
            f"{tree / PR_RECIPE}: corpus has neither csv_dir nor path; this s3prl version is not supported"
        )
    corpus["num_workers"] = min(corpus.get("num_workers", 12), os.cpu_count() or 1)
    config["optimizer"]["lr"] = PR_LR
    config["runner"] = scale_runner(config["runner"], args.steps)
    return write_yaml(apply_overrides(config, overrides(args, "pr", config)), out / "pr.yaml")


def overrides(args, task: str, config: dict) -> list[str]:
    """``--smoke``'s settings (when given), then the user's ``--set`` items: later ones win."""
    smoke = [*SMOKE[task], f"runner.eval_step={config['runner']['total_steps']}"] if args.smoke else []
    return smoke + args.set


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Set each ``dotted.key=yaml value`` of ``overrides`` in ``config`` (in place); keys must exist.

    Example: ``apply_overrides({"runner": {"log_step": 100}}, ["runner.log_step=5"])`` sets it to 5.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"--set {item!r}: the config has no key {key!r}")
        node[leaf] = yaml.safe_load(value)
    return config


def write_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_logged(command: list[str], cwd: Path, env: dict, log: Path) -> str:
    """Run ``command``; its output goes to ``log`` and to the console less other libraries' chatter.

    Python warnings and s3prl's optional-upstream notices stay in ``log`` (on screen too with
    ``S3PRL_LASER_LOG=debug``); see :func:`s3prl_laser.console.mark_chatter`. Returns the whole output.
    """
    print(f"+ (cd {cwd} && {' '.join(command)})", flush=True)
    lines = []
    with (
        open(log, "w") as log_file,
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process,
    ):
        show_all = debug_requested()
        for line, chatter in mark_chatter(process.stdout):
            if show_all or not chatter:
                sys.stdout.write(line)
            log_file.write(line)
            lines.append(line)
    if process.returncode != 0:
        raise RuntimeError(
            f"s3prl's run_downstream failed (exit {process.returncode}); its output is in {log}"
        )
    return "".join(lines)


def pick_checkpoint(expdir: Path, eval_split: str) -> Path:
    """SUPERB's protocol: the best checkpoint on the dev split; else (never improved) the last one saved."""
    best = expdir / f"{eval_split}-best.ckpt"
    if best.is_file():
        return best
    states = sorted(glob.glob(str(expdir / "states-*.ckpt")), key=lambda p: int(Path(p).stem.split("-")[1]))
    if not states:
        raise RuntimeError(f"no checkpoint in {expdir}: training saved neither {best.name} nor states-*.ckpt")
    print(f"note: {best.name} was never written (the dev metric never improved); evaluating {states[-1]}")
    return Path(states[-1])


def parse_metric(output: str, split: str, key: str) -> float:
    """The value of the last ``<split> <key>: <value>`` line s3prl printed."""
    values = re.findall(rf"^{re.escape(split)} {re.escape(key)}: (\S+)$", output, flags=re.MULTILINE)
    if not values:
        raise RuntimeError(f"s3prl printed no '{split} {key}: ...' line")
    return float(values[-1])


def check_upstream(name: str, ckpt: Path | None) -> None:
    """``ValueError`` naming ``--upstream``/``--ckpt`` unless s3prl has the entry and the checkpoint reads.

    For ``hubert_laser``/``wavlm_laser`` the checkpoint (given, or the default location) is read as the
    entry will read it; for other entries a given ``--ckpt`` must exist and be a complete file.
    """
    import s3prl.hub

    from s3prl_laser.models.s3prl_format import check_checkpoint_file
    from s3prl_laser.plugin.registration import ENTRY_NAMES

    if not callable(getattr(s3prl.hub, name, None)):
        raise ValueError(
            f"--upstream {name}: s3prl.hub has no such entry (e.g. hubert_laser, wavlm_laser, hubert_local)"
        )
    if name in ENTRY_NAMES:
        from s3prl_laser.plugin.hubconf import checked_ckpt

        checked_ckpt(name, ckpt)
    elif ckpt is not None:
        check_checkpoint_file(ckpt, "--ckpt")


def prepare(task_key: str, args, out: Path) -> tuple[Path, Path, str]:
    """Check the inputs, write data tables and the resolved config; returns (s3prl tree, config, device)."""
    from s3prl_laser.training.paths import check_output_folder

    check_output_folder(out, "--out")
    if not args.librispeech.is_dir():
        raise ValueError(f"--librispeech {args.librispeech}: no such folder (the LibriSpeech root)")
    tree = s3prl_tree(args.s3prl_src)
    recipe = pr_recipe(args, tree) if task_key == "pr" else None  # files only: before s3prl's slow import
    if recipe is not None:
        corpus, text = recipe["downstream_expert"]["corpus"], recipe["downstream_expert"]["text"]
        check_lexicons(args.librispeech, corpus["lexicon"], text["vocab_file"])
    if args.s3prl_src is not None:
        check_tree_imports(tree, PR_MODULES if task_key == "pr" else PR_MODULES[:2])
    check_upstream(args.upstream, args.ckpt)
    if (out / "exp").exists() and any((out / "exp").iterdir()):
        raise ValueError(f"{out / 'exp'} already holds a run; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    config = asr_config(args, out) if task_key == "asr" else pr_config(args, out, tree, recipe)
    return tree, config, resolve_device(args.device)


def train_and_evaluate(task: Task, args, out: Path, tree: Path, config: Path, device: str) -> dict:
    """Run s3prl's train then evaluate commands; returns the result.json content."""
    env = dict(os.environ)
    cwd = out
    if args.s3prl_src is not None:  # run the checkout's code; relative recipe paths resolve from its s3prl/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree.parent), env.get("PYTHONPATH")]))
        cwd = tree
    expdir = out / "exp"
    upstream = ["-u", args.upstream] + (["-k", str(args.ckpt.resolve())] if args.ckpt else [])
    run_downstream = [sys.executable, "-m", "s3prl.run_downstream"]
    train = ["-m", "train", *upstream, "-d", task.downstream, "-c", str(config), "-p", str(expdir)]
    run_logged([*run_downstream, *train, "--device", device], cwd, env, out / "train.log")

    eval_split = yaml.safe_load(config.read_text())["runner"]["eval_dataloaders"][0]
    checkpoint = pick_checkpoint(expdir, eval_split)
    eval_env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # runner checkpoints hold a Namespace
    evaluate = ["-m", "evaluate", "-t", task.test_split, "-e", str(checkpoint), "--device", device]
    output = run_logged([*run_downstream, *evaluate], cwd, eval_env, out / "evaluate.log")

    value = parse_metric(output, task.test_split, task.printed_metric) * task.to_percent
    if not math.isfinite(value):
        raise RuntimeError(f"s3prl printed a non-finite {task.metric}: {value}")
    print(
        f"SUPERB {task.name} {task.test_split} {task.metric}: {value:.2f} % "
        f"({args.upstream}, {checkpoint.name})"
    )
    return {"task": task.name, "upstream": args.upstream, "metric": task.metric, "value": value}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TASKS:
        print(
            f"usage: superb.py {{{','.join(TASKS)}}} ARGS (see superb_asr.sh / superb_pr.sh)", file=sys.stderr
        )
        return 2
    task_key, *rest = argv
    args = get_args_parser(task_key).parse_args(rest)
    out = args.out.resolve()
    try:
        tree, config, device = prepare(task_key, args, out)
    except ValueError as err:  # a missing or wrong input, named in the message
        print(f"superb_{task_key}: error: {err}", file=sys.stderr)
        return 2
    try:
        result = train_and_evaluate(TASKS[task_key], args, out, tree, config, device)
    except RuntimeError as err:
        print(f"superb_{task_key}: error: {err}", file=sys.stderr)
        return 1
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"result: {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
