"""The fine-tuning configuration: one dataclass with every default, plus YAML merging.

Resolution order (dinov2 style): dataclass defaults < the upstream's preset
(``upstream_configs/<upstream>_laser.yaml``) < ``--demo`` preset (``demo.yaml``) < a user YAML
(``--config``) < ``key=value`` overrides. A resumed run (:func:`resume_config`) starts from the run's own
``config.yaml`` instead, and only what the command line gives changes it, within :data:`RESUME_RULES`
(what a changed key does on ``--resume``: applied, or refused). Each override value is parsed
with ``yaml.safe_load`` (so ``lr=1e-4`` is a float and ``speed_factors=[0.9,1.1]`` a list), never ``eval``.

Example::

    >>> cfg = resolve_config("hubert", overrides=["steps=10", "lr=1e-4"])
    >>> cfg.steps, cfg.lr, cfg.alpha
    (10, 0.0001, 0.4)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from s3prl_laser.errors import UserInputError
from s3prl_laser.names import LOSS_TYPES, UPSTREAMS
from s3prl_laser.training.paths import absolute_paths

PRESET_PACKAGE = "s3prl_laser.upstream_configs"
FRAME_COUNTS = ("cnn", "round")


@dataclass
class LaserConfig:
    """Every knob of a LASER fine-tuning run, with the paper's HuBERT recipe as defaults."""

    # --- model ---
    upstream: str = "hubert"  # base SSL model family: "hubert" or "wavlm"
    ckpt: str | None = None  # base checkpoint path/URL; None = s3prl's hubert_base / wavlm_base download
    trainable_layers: int = 2  # top transformer layers that are trained (the rest is frozen)
    train_final_layer_norm: bool = True  # also train the encoder's final layer norm
    proj_dim: int = 256  # projection head output size (Linear 768 -> 256, then L2 norm)
    # --- loss ---
    loss_type: str = "softdtw_lav"  # "softdtw_lav" (divergence + contrastive-IDM) or "softdtw" (ablation)
    gamma: float = 0.1  # soft-DTW smoothing
    alpha: float = 0.4  # weight of the temporal regulariser
    sigma: int = 0  # regulariser window: |i - j| <= sigma counts as a neighbour
    margin: float = 1.1  # regulariser margin for non-neighbour frames
    bandwidth: int | None = None  # Sakoe-Chiba band for soft-DTW; None = full matrix (paper)
    softdtw_backend: str = "auto"  # "auto" (Triton on GPU), or a backend name of s3prl_laser.softdtw
    # --- perturbation (second view) ---
    speed_factors: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])  # speed factor choices
    pitch_semitones: float = 2.0  # pitch shift of +/- this many semitones (50/50)
    swap_prob: float = 0.5  # probability of swapping the (clean, perturbed) pair
    # --- data ---
    data: str | None = None  # LibriSpeech root, audio folder or manifest file
    data_subsets: list[str] = field(default_factory=lambda: ["train-clean-100"])  # LibriSpeech splits
    # Train on audio under LibriSpeech dev-*/test-* split folders (SUPERB scores on them: contamination).
    # false = such clips, found through any kind of --data, are refused before any model is loaded.
    allow_held_out_splits: bool = False
    sample_rate: int = 16000  # audio must be at this rate (LibriSpeech is 16 kHz)
    # Random crop length, in seconds. The official LASER code feeds whole utterances (no crop). LibriSpeech
    # segments are at most 35 s, so 35 keeps every LibriSpeech clip whole, as the official code does, and
    # only guards other data (e.g. hour-long recordings: soft-DTW costs frames^2); null = never crop.
    max_seconds: float | None = 35.0
    min_samples: int = 400  # clips shorter than this (one conv receptive field) are skipped
    bucket_batches: int = 50  # length bucketing: sort chunks of this many batches by length
    # Audio budget of one forward/backward pass, in seconds: 2 views x pairs x the longest view (a clip
    # stretched by the slowest speed factor), i.e. the padded [2b, T] tensor the model sees. It never changes
    # which pairs make a step: a batch that would exceed it runs as micro-batches within it, their gradients
    # accumulated into the batch's step; a clip longer than one pair's share is cropped to it (counted).
    # Presets: sized so that the paper's recipe fits a 24 GB GPU (README, "Memory"); null = no bound.
    max_batch_seconds: float | None = 120.0
    num_workers: int | None = (
        None  # DataLoader workers per process; null = CPUs per process on this machine - 1
    )
    prefetch_batches: int = 4  # batches each worker keeps ready ahead of the training step
    perturb_on: str = "workers"  # "workers": perturb on the CPU in the DataLoader workers; "device": in the
    #                              training step, batched, on the training device (GPU)
    # --- optimisation ---
    steps: int = 3600  # optimizer steps (3600 x 8 pairs is about one epoch of train-clean-100)
    batch_size: int = 8  # pairs per batch, whatever max_batch_seconds (per process under DDP: N x this)
    grad_accum_steps: int = 1  # batches per optimizer step, gradients accumulated (official: batch 1 x 8)
    lr: float = 2e-5  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay (torch's default)
    warmup_steps: int = 1000  # linear warm-up steps, then linear decay to 0 at `steps`
    warmup_from_zero: bool = False  # first step at lr 0 (official) instead of lr / warmup_steps
    grad_clip: float = 1.0  # gradient clipping by global norm
    precision: str = "bf16"  # "bf16" autocast on CUDA (soft-DTW in fp32) or "fp32"; CPU always fp32
    fp32_head: bool = False  # run the projection head in fp32 under bf16 autocast (official: all fp32)
    frame_count: str = "cnn"  # frames per clip: "cnn" (the CNN's formula) or "round" (round(L / 320))
    seed: int = 0  # seeds the head init, the data order and the per-clip perturbations
    # --- processes (torchrun) ---
    # Bound of every collective, in seconds: a rank that waits longer for the others (one hung, or died
    # where it could not tell them) fails instead of waiting (NCCL's async error handling ends it). The
    # first start's length index is built by rank 0 while the others wait: raise this for huge corpora on
    # slow storage (docs/cluster.md).
    dist_timeout_s: float = 1800.0
    # --- bookkeeping ---
    save_every: int = 500  # write a training checkpoint every this many steps
    log_every: int = 10  # TensorBoard scalars every this many steps
    # --- validation (held-out clips; see s3prl_laser.training.heldout) ---
    eval_every: int = 250  # validate every this many steps and at the last one; 0 = never
    eval_clips: int = 32  # held-out clips: dev-clean if --data has it, else a seeded share of --data
    collapse_threshold: float = 0.3  # warn once when a far-frame distance (collapse guard) falls below
    # --- demo report (only with --demo) ---
    report_clips: int = 8  # held-out clips in the before/after report
    # --- probe (s3prl_laser.probe) ---
    probe: bool = False  # at the end, CER probe of the tuned and the base upstream on the same clips
    probe_steps: int = 2000  # that probe's head step budget (python -m s3prl_laser.probe --steps)

    def __post_init__(self) -> None:
        check(self)


def check(cfg: LaserConfig) -> None:
    """Raise ``UserInputError`` (a ``ValueError``) naming the key when a value is out of range."""
    if cfg.upstream not in UPSTREAMS:
        raise UserInputError(f"upstream={cfg.upstream!r}: choose one of {UPSTREAMS}")
    if cfg.loss_type not in LOSS_TYPES:
        raise UserInputError(f"loss_type={cfg.loss_type!r}: choose one of {LOSS_TYPES}")
    if cfg.precision not in ("bf16", "fp32"):
        raise UserInputError(f"precision={cfg.precision!r}: choose 'bf16' or 'fp32'")
    if cfg.frame_count not in FRAME_COUNTS:
        raise UserInputError(f"frame_count={cfg.frame_count!r}: choose one of {FRAME_COUNTS}")
    positive = ("steps", "batch_size", "save_every", "log_every", "proj_dim", "sample_rate", "bucket_batches")
    positive += ("prefetch_batches", "grad_accum_steps", "probe_steps")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise UserInputError(f"{key}={getattr(cfg, key)!r} must be >= 1")
    for key in ("lr", "gamma", "dist_timeout_s"):
        if not getattr(cfg, key) > 0:
            raise UserInputError(f"{key}={getattr(cfg, key)!r} must be > 0")
    if cfg.eval_clips < 2:
        raise UserInputError(f"eval_clips={cfg.eval_clips!r} must be >= 2 (the metrics compare clips)")
    for key in ("trainable_layers", "warmup_steps", "num_workers", "alpha", "sigma", "min_samples",
                "eval_every", "collapse_threshold", "grad_clip"):  # fmt: skip
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise UserInputError(f"{key}={getattr(cfg, key)!r} must be >= 0")
    if not 0.0 <= cfg.swap_prob <= 1.0:
        raise UserInputError(f"swap_prob={cfg.swap_prob!r} must be in [0, 1]")
    if not cfg.speed_factors or any(f <= 0 for f in cfg.speed_factors):
        raise UserInputError(
            f"speed_factors={cfg.speed_factors!r} must be a non-empty list of positive numbers"
        )
    if not cfg.data_subsets:
        raise UserInputError("data_subsets must name at least one LibriSpeech split, e.g. [train-clean-100]")
    held_out = [s for s in cfg.data_subsets if s.startswith(("dev-", "test-"))]
    if held_out and not cfg.allow_held_out_splits:
        raise UserInputError(
            f"data_subsets={cfg.data_subsets!r} names the evaluation split(s) {held_out}: training on them "
            "contaminates SUPERB scores; set allow_held_out_splits=true if you mean it"
        )
    if cfg.perturb_on not in ("workers", "device"):
        raise UserInputError(f"perturb_on={cfg.perturb_on!r}: choose 'workers' or 'device'")
    stretch = max(1.0, 1.0 / min(cfg.speed_factors))
    smallest_pair = 2 * stretch * max(cfg.min_samples, 1) / cfg.sample_rate
    if cfg.max_batch_seconds is not None and cfg.max_batch_seconds < smallest_pair:
        raise UserInputError(
            f"max_batch_seconds={cfg.max_batch_seconds!r} cannot hold one pair of clips of min_samples="
            f"{cfg.min_samples} (2 views x {stretch:.3g} x {cfg.min_samples} samples = "
            f"{smallest_pair:.3g} s); raise it, or set it to null"
        )
    if cfg.max_seconds is not None and cfg.max_seconds * cfg.sample_rate < max(cfg.min_samples, 1):
        raise UserInputError(f"max_seconds={cfg.max_seconds!r} is shorter than min_samples={cfg.min_samples}")


# What a key given on ``--resume`` does, one class per key (docs/training.md renders this table):
#   "applied": the resumed run uses the new value from its next step on (the optimizer's lr and weight decay
#              and the schedule too: see s3prl_laser.training.parts.apply_schedule);
#   "refused": exit 2 naming the key: it changes the model's shape or weights, or which data a step sees,
#              and the checkpoint's data position and weights only mean something with the old value.
APPLIED, REFUSED = "applied", "refused"
RESUME_RULES: dict[str, tuple[str, str]] = {
    "upstream": (REFUSED, "the base model family"),
    "ckpt": (REFUSED, "the base weights under the trained layers"),
    "trainable_layers": (REFUSED, "which parameters the checkpoint holds (the model's shape)"),
    "train_final_layer_norm": (REFUSED, "which parameters the checkpoint holds (the model's shape)"),
    "proj_dim": (REFUSED, "the projection head's shape"),
    "loss_type": (APPLIED, "the loss of the next steps"),
    "gamma": (APPLIED, "the loss of the next steps (and the validation's divergence)"),
    "alpha": (APPLIED, "the loss of the next steps"),
    "sigma": (APPLIED, "the loss of the next steps"),
    "margin": (APPLIED, "the loss of the next steps"),
    "bandwidth": (APPLIED, "the loss of the next steps"),
    "softdtw_backend": (APPLIED, "which engine computes the same soft-DTW"),
    "speed_factors": (REFUSED, "the second view of every pair"),
    "pitch_semitones": (REFUSED, "the second view of every pair"),
    "swap_prob": (REFUSED, "the order of every pair"),
    "data": (REFUSED, "which clips the data position counts"),
    "data_subsets": (REFUSED, "which clips the data position counts"),
    "allow_held_out_splits": (REFUSED, "which clips the data position counts"),
    "sample_rate": (REFUSED, "which clips are read, and how"),
    "max_seconds": (REFUSED, "the crops, hence the length buckets and batches"),
    "min_samples": (REFUSED, "which clips are skipped"),
    "bucket_batches": (REFUSED, "the batches of every epoch"),
    "max_batch_seconds": (APPLIED, "memory only: the same batches in other micro-batches (a clip longer "
                          "than one pair's share of the new budget is cropped to it)"),
    "num_workers": (APPLIED, "DataLoader workers; the same batches"),
    "prefetch_batches": (APPLIED, "DataLoader read-ahead; the same batches"),
    "perturb_on": (APPLIED, "where the same seeded perturbations run"),
    "steps": (APPLIED, "the schedule decays from the current lr to 0 at the new last step, without a jump; "
                       "a finished run starts a new decay from lr"),  # fmt: skip
    "batch_size": (REFUSED, "the batches of every epoch"),
    "grad_accum_steps": (REFUSED, "which batches make a step"),
    "lr": (APPLIED, "the peak lr: optimizer and schedule scale to it from the next step"),
    "weight_decay": (APPLIED, "AdamW's weight decay from the next step"),
    "warmup_steps": (APPLIED, "the schedule moves from the current lr to the new warm-up's, without a jump"),
    "warmup_from_zero": (APPLIED, "the warm-up's first steps, if warm-up is not over"),
    "grad_clip": (APPLIED, "clipping of the next steps"),
    "precision": (APPLIED, "autocast of the next steps"),
    "fp32_head": (APPLIED, "the head's precision under autocast"),
    "frame_count": (APPLIED, "the frames the loss counts"),
    "seed": (REFUSED, "the data order, the perturbations and the head's initialisation"),
    "dist_timeout_s": (APPLIED, "how long a collective waits for a lost process"),
    "save_every": (APPLIED, "checkpoint cadence"),
    "log_every": (APPLIED, "TensorBoard cadence"),
    "eval_every": (APPLIED, "validation cadence only: the held-out clips are those the run started with "
                            "(turning validation on for a run that held none out is refused, unless "
                            "dev-clean is beside the data)"),  # fmt: skip
    "eval_clips": (REFUSED, "which clips are held out: some would become training clips, or the reverse"),
    "collapse_threshold": (APPLIED, "the collapse warning and which validations may become the best"),
    "report_clips": (APPLIED, "the demo report"),
    "probe": (APPLIED, "whether the probe runs at the end"),
    "probe_steps": (APPLIED, "the end-of-run probe's head step budget"),
}


def no_op_warnings(cfg: LaserConfig) -> list[str]:
    """One line per setting that makes (part of) training a no-op; the command logs them as warnings."""
    warnings = []
    if cfg.steps <= cfg.warmup_steps:
        reached = (cfg.steps - cfg.warmup_from_zero) / cfg.warmup_steps
        warnings.append(
            f"steps={cfg.steps} <= warmup_steps={cfg.warmup_steps}: the learning rate never leaves its "
            f"warm-up (at most {reached:.0%} of lr={cfg.lr:g}, at the last step); lower warmup_steps"
        )
    if cfg.trainable_layers == 0 and not cfg.train_final_layer_norm:
        warnings.append(
            "trainable_layers=0 and train_final_layer_norm=false: only the projection head trains, and it is "
            "not part of the exported upstream (which will equal the base model); set trainable_layers >= 1"
        )
    if cfg.grad_clip == 0:
        warnings.append("grad_clip=0: clipping to norm 0 sets every gradient to 0; use a positive norm")
    return warnings


def refused_changes(old: LaserConfig, new: LaserConfig) -> list[str]:
    """``"key old -> new"`` for each key that differs and that :data:`RESUME_RULES` refuses on resume."""
    before, after = to_dict(old), to_dict(new)
    return [
        f"{key} {_show(before[key])} -> {_show(after[key])}"
        for key, (rule, _) in RESUME_RULES.items()
        if rule == REFUSED and before[key] != after[key]
    ]


def resume_table() -> str:
    """:data:`RESUME_RULES` as a markdown table (docs/training.md holds this text; a test compares them)."""
    rows = ["| key | on `--resume` | why |", "| --- | --- | --- |"]
    rows += [f"| `{key}` | {rule} | {why} |" for key, (rule, why) in RESUME_RULES.items()]
    return "\n".join(rows) + "\n"


def config_keys() -> list[str]:
    """Names of all configuration keys, in declaration order."""
    return [f.name for f in dataclasses.fields(LaserConfig)]


def read_preset(name: str) -> dict[str, Any]:
    """Read ``upstream_configs/<name>.yaml`` shipped with the package (works after ``pip install``)."""
    resource = importlib.resources.files(PRESET_PACKAGE) / f"{name}.yaml"
    if not resource.is_file():
        raise UserInputError(
            f"no preset {name}.yaml in {PRESET_PACKAGE}; is the package installed correctly?"
        )
    return _as_mapping(yaml.safe_load(resource.read_text()), f"preset {name}.yaml")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a user configuration YAML (a flat mapping of config keys); relative paths in it (``data``,
    ``ckpt``) are made absolute against the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a YAML file" if path.is_dir() else "no such file"
        raise UserInputError(f"--config {path}: {what}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserInputError(
            f"--config {path}{where}: YAML syntax error ({error.problem}); fix the file "
            "(it holds one `key: value` per line)"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise UserInputError(f"--config {path}: cannot be read as YAML ({error})") from None
    return absolute_paths(_as_mapping(data, str(path)), path.absolute().parent)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; each value goes through ``yaml.safe_load``; relative paths (``data``,
    ``ckpt``) are made absolute against the working directory."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"override {item!r} is not of the form key=value (e.g. steps=100)")
        parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return absolute_paths(parsed)


def merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    """Return ``base`` updated with ``update``; an unknown key raises ``ValueError`` naming it."""
    known = set(config_keys())
    for key in update:
        if key not in known:
            raise UserInputError(
                f"unknown config key {key!r} in {source}; known keys: {', '.join(sorted(known))}"
            )
    return {**base, **update}


def resolve_config(
    upstream: str,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    demo: bool = False,
    extra: dict[str, Any] | None = None,
) -> LaserConfig:
    """Build the run's config: preset < demo preset < ``config_file`` < ``extra`` (CLI flags) < overrides.

    The preset is the family's (``<upstream>_laser.yaml``), and for a large checkpoint (more than 12 layers or
    768 dims, read from ``ckpt`` by :func:`s3prl_laser.models.sources.model_size`) that of its size on top
    (``<upstream>_large_laser.yaml``).
    """
    from s3prl_laser.models.sources import model_size

    if upstream not in UPSTREAMS:
        raise UserInputError(f"--upstream {upstream!r}: choose one of {UPSTREAMS}")
    given: dict[str, Any] = {}
    if demo:
        given = merge(given, read_preset("demo"), "demo.yaml")
    if config_file is not None:
        given = merge(given, read_yaml(config_file), str(config_file))
    given = merge(given, extra or {}, "command-line flags")
    given = merge(given, parse_overrides(overrides or []), "key=value overrides")
    values: dict[str, Any] = {"upstream": upstream}
    values = merge(values, read_preset(f"{upstream}_laser"), f"{upstream}_laser.yaml")
    if model_size(upstream, given.get("ckpt")) == "large":
        values = merge(values, read_preset(f"{upstream}_large_laser"), f"{upstream}_large_laser.yaml")
    return from_dict({**values, **given})


def resume_config(
    saved: str | Path,
    upstream: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[LaserConfig, list[str]]:
    """The config of a resumed run: the run's own ``config.yaml``, then only what the command line gives.

    ``saved`` is the run's resolved config (``OUT/config.yaml``); a ``config_file``, ``extra`` (command-line
    flags) and ``overrides`` are applied on top of it in that order, and presets are not read again, so a
    key the command line does not name keeps the run's value. Returns the config and one ``"key: old ->
    new"`` line per key whose value changed. ``ValueError`` if ``saved`` is missing or unreadable, if
    ``upstream`` is given and is not the run's, or if a key that :data:`RESUME_RULES` refuses changes.

    Example::

        >>> cfg, changes = resume_config("runs/h/config.yaml", overrides=["steps=5000"])  # doctest: +SKIP
        >>> changes  # doctest: +SKIP
        ['steps: 3600 -> 5000']
    """
    saved = Path(saved)
    if not saved.is_file():
        raise UserInputError(f"--resume: {saved} not found; is --out the folder of an earlier run?")
    damaged = (
        f"--resume: {saved} is damaged (cut short or edited: %s); restore it from a copy (the newest "
        "checkpoints/step_*.pt holds the run's config under 'config'), or start a new run with another --out"
    )
    try:
        values = _as_mapping(yaml.safe_load(saved.read_text()), str(saved))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UserInputError(damaged % f"{where}YAML syntax error, {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise UserInputError(damaged % f"not readable as YAML, {error.__class__.__name__}") from None
    except UserInputError as error:  # not a mapping
        raise UserInputError(damaged % error) from None
    before = from_dict(merge({}, values, str(saved)))
    if upstream is not None and upstream != before.upstream:
        raise UserInputError(f"--upstream {upstream}: the run in {saved.parent} is a {before.upstream} run")
    updates: dict[str, Any] = {}
    if config_file is not None:
        updates = merge(updates, read_yaml(config_file), str(config_file))
    updates = merge(updates, extra or {}, "command-line flags")
    updates = merge(updates, parse_overrides(overrides or []), "key=value overrides")
    after = from_dict({**values, **updates})
    refused = refused_changes(before, after)
    if refused:
        raise UserInputError(
            f"--resume: {'; '.join(refused)}: a resumed run keeps these keys (they change the model's shape "
            f"or which data a step sees; see docs/training.md); start a new run with another --out"
        )
    old, new = to_dict(before), to_dict(after)
    changes = [f"{key}: {_show(old[key])} -> {_show(new[key])}" for key in new if old[key] != new[key]]
    return after, changes


def _show(value: Any) -> str:
    """A config value as it reads in YAML (``null``, ``true``, ``[0.9, 1.1]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def from_dict(values: dict[str, Any]) -> LaserConfig:
    """Build a validated ``LaserConfig``, coercing YAML scalars to the declared types."""
    values = merge({}, values, "config")
    coerced = {}
    for f in dataclasses.fields(LaserConfig):
        if f.name in values:
            coerced[f.name] = _coerce(f, values[f.name])
    return LaserConfig(**coerced)


def to_dict(cfg: LaserConfig) -> dict[str, Any]:
    """Plain-dict view (YAML/JSON/``torch.save(weights_only)`` friendly)."""
    return dataclasses.asdict(cfg)


def write_config(cfg: LaserConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with ``--config``), atomically (a temporary file, then
    a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Coerce ``value`` to field ``f``'s declared type (ints to floats, lists checked); None where allowed."""
    key, kind = f.name, f.type  # f.type is the annotation's text (``from __future__ import annotations``)
    example = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        if example is None or kind.endswith("| None"):
            return None
        raise UserInputError(f"{key}: null is not allowed (default {example!r})")
    if isinstance(example, bool):
        if not isinstance(value, bool):
            raise UserInputError(f"{key}={value!r} must be true or false")
        return value
    if isinstance(example, list):
        if not isinstance(value, list):
            value = [value]
        if example and isinstance(example[0], float):
            return [_number(key, v, float) for v in value]
        return [str(v) for v in value]
    if isinstance(example, float) or kind.startswith("float"):
        return _number(key, value, float)
    if isinstance(example, int) or kind.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return _number(key, value, int)
    if isinstance(example, str) or example is None:
        if isinstance(value, (dict, list)):
            raise UserInputError(f"{key}={value!r} must be a string")
        return str(value)
    return value


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
        try:
            value = kind(value)
        except ValueError:
            raise UserInputError(f"{key}={value!r} must be a number") from None
    wrong_type = not isinstance(value, (int, float)) or (kind is int and isinstance(value, float))
    if isinstance(value, bool) or wrong_type:
        raise UserInputError(f"{key}={value!r} must be a{'n integer' if kind is int else ' number'}")
    return kind(value)


def _as_mapping(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{source} must be a YAML mapping of config keys, got {type(data).__name__}")
    return data
