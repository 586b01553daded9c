"""The whole probe: clips, targets, features per upstream, a head per upstream and target kind, report.

Every upstream sees the same clips, the same seed and the same step budget. The dev slice for early
stopping is a seeded tenth of the training clips (at least one clip), which the head does not train on;
the error rates are measured on the evaluation clips (dev-clean).

Example::

    >>> settings = ProbeSettings("/data/LibriSpeech", ["hubert_local:b.pt"], Path("p"))  # doctest: +SKIP
    >>> results = run_probe(settings)  # doctest: +SKIP
    >>> results[0]["cer"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from s3prl_laser.errors import UserInputError

logger = logging.getLogger("s3prl_laser.probe")


@dataclass(frozen=True)
class ProbeSettings:
    data: str  # LibriSpeech root or its parent
    upstreams: list[str]  # "name" or "name:ckpt", the first is the reference of the table
    out: Path
    lexicons: list[str] = field(default_factory=list)  # g2p lexicon files: adds phone targets (PER)
    train_hours: float = 1.0  # of train-clean-100
    dev_minutes: float = 20.0  # of dev-clean
    steps: int = 2000  # head step budget
    batch_size: int = 16
    lr: float = 2e-3
    hidden: int = 0  # 0: linear CTC head
    eval_every: int = 100
    patience: int = 5
    seed: int = 0
    layer_norm: bool = True  # each layer normalised over its channels before the weighted sum
    seeds: int = 1  # heads trained per upstream and target kind (seed, seed + 1, ...): the seed's spread
    device: str | None = None
    cache: Path | None = None  # default: <out>/cache


def split_dev_slice(n: int, seed: int) -> tuple[list[int], list[int]]:
    """``(training indices, dev-slice indices)``: a seeded tenth of ``range(n)`` (at least one) for early
    stopping."""
    if n < 2:
        raise UserInputError(f"the probe needs at least 2 training clips, found {n}")
    dev = set(random.Random(seed).sample(range(n), max(1, n // 10)))
    return [i for i in range(n) if i not in dev], sorted(dev)


def run_probe(settings: ProbeSettings, show: bool = True) -> list[dict]:
    """Probe every upstream; write the outputs into ``settings.out``; return one result dict per upstream."""
    from s3prl_laser.probe.clips import probe_clips
    from s3prl_laser.probe.report import format_table, write_outputs

    cache = settings.cache or settings.out / "cache"
    specs, lexicon = checked_inputs(settings, cache)  # user mistakes first, before any audio is read
    train, evaluation = probe_clips(settings.data, settings.train_hours, settings.dev_minutes, settings.seed)
    logger.info(
        "probe clips: %d training (%.1f min, %d speakers), %d evaluation (%.1f min, %d speakers)",
        len(train), sum(c.seconds for c in train) / 60, len({c.speaker for c in train}),
        len(evaluation), sum(c.seconds for c in evaluation) / 60, len({c.speaker for c in evaluation}),
    )  # fmt: skip
    kinds = probe_targets(settings, [c.text for c in train + evaluation], lexicon)
    results = [
        probe_upstream(settings, upstream_label(upstream), spec, train, evaluation, kinds, cache)
        for upstream, spec in zip(settings.upstreams, specs, strict=True)
    ]
    add_intervals(results, settings.seed)
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    summary.update(train_clips=[c.utt_id for c in train], eval_clips=[c.utt_id for c in evaluation])
    paths = write_outputs(results, summary, settings.out)
    if show:  # else the caller shows the results (the demo report does)
        print(format_table(results))
    print(f"probe: {paths['json']}, layer weights: {paths['png']}")
    return results


def checked_inputs(settings: ProbeSettings, cache: Path) -> tuple[list, dict | None]:
    """The data folders (a cheap check, made before s3prl is imported), then the upstreams (a base in another
    format is converted once, cached) and the lexicons: ``(specs, lexicon)``; a mistake raises
    ``UserInputError`` before any audio is read or model loaded."""
    from s3prl_laser.probe.bases import resolve_upstream
    from s3prl_laser.probe.clips import probe_root
    from s3prl_laser.probe.features import check_upstream
    from s3prl_laser.probe.targets import read_lexicons

    probe_root(settings.data)
    specs = [resolve_upstream(u, cache) for u in settings.upstreams]
    for spec in specs:
        check_upstream(spec)
    return specs, read_lexicons(settings.lexicons) if settings.lexicons else None


def probe_targets(settings: ProbeSettings, texts: list[str], lexicon: dict | None) -> dict:
    """Per error rate (``cer``, and ``per`` with a lexicon): its vocabulary and each clip's units."""
    from s3prl_laser.probe.targets import Vocabulary, char_units, phone_units

    kinds = {"cer": (Vocabulary.characters(), [char_units(t) for t in texts])}
    if lexicon is not None:
        phones = phone_units(texts, lexicon, ", ".join(map(str, settings.lexicons)))
        kinds["per"] = (Vocabulary.of(phones), phones)
    return kinds


def probe_upstream(settings: ProbeSettings, label: str, spec, train: list, evaluation: list, kinds: dict,
                   cache: Path) -> dict:  # fmt: skip
    """One upstream: its features (extracted or from the cache), then a head per error rate trained and
    scored on the evaluation clips (``--seeds``: trained again with other seeds)."""
    import torch

    from s3prl_laser.probe.features import load_or_extract, on_device

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    feats = on_device(load_or_extract(spec, train + evaluation, device, cache, settings.layer_norm), device)
    result = {
        "upstream": label,  # as the user wrote it (a relative path made absolute)
        "name": spec.name,  # the s3prl entry and checkpoint that loaded it
        "ckpt": spec.ckpt,
        "layer_weights": {},
        "training": {},
        "utterances": {},  # per evaluation clip: edits, reference length, greedy hypothesis
    }
    for kind, (vocab, units) in kinds.items():
        targets = [vocab.encode(u) for u in units]
        score_kind(settings, result, kind, vocab, feats, targets, len(train), spec.name, device)
    return result


def score_kind(settings: ProbeSettings, result: dict, kind: str, vocab, feats, targets: list, n_train: int,
               name: str, device) -> None:  # fmt: skip
    """Train the ``kind`` head on the training clips' features (early stopping on a held slice), decode the
    evaluation clips, and put the pooled error rate, each clip's edits and the head's layer weights into
    ``result``."""
    from s3prl_laser.probe.decode import decode_all, edit_counts
    from s3prl_laser.probe.features import Rows
    from s3prl_laser.probe.head import HeadSettings, train_head
    from s3prl_laser.probe.stats import pooled_rate

    fit, stop = split_dev_slice(n_train, settings.seed)
    eval_x = Rows(feats, range(n_train, len(feats)))
    train_y, eval_y = targets[:n_train], targets[n_train:]
    head_settings = HeadSettings(
        settings.steps, settings.batch_size, settings.lr, settings.hidden, settings.eval_every,
        settings.patience, settings.seed,
    )  # fmt: skip

    def trained(seed: int, desc: str):
        return train_head(
            Rows(feats, fit), [train_y[i] for i in fit], Rows(feats, stop), [train_y[i] for i in stop],
            len(vocab), dataclasses.replace(head_settings, seed=seed), device, desc=desc,
        )  # fmt: skip

    head, info = trained(settings.seed, f"{kind} head {name}")
    hypotheses = decode_all(head, eval_x, settings.batch_size, device)
    edits, lengths = edit_counts(eval_y, hypotheses), [len(y) for y in eval_y]
    result[kind] = pooled_rate(edits, lengths)
    result["utterances"][kind] = {
        "edits": edits, "ref_lengths": lengths, "hypotheses": [vocab.decode(h) for h in hypotheses]
    }
    result["layer_weights"][kind] = head.layer_weights().cpu().tolist()
    result["training"][kind] = info
    logger.info(
        "%s: %s %.2f %% (head: %d steps, best at %d)",
        result["upstream"], kind.upper(), 100 * result[kind], info["steps"], info["best_step"],
    )  # fmt: skip
    if settings.seeds > 1:  # the same head again with other seeds: how much the seed alone moves it
        rates = [result[kind]]
        for extra in range(1, settings.seeds):
            seed = settings.seed + extra
            again, _ = trained(seed, f"{kind} head {name}, seed {seed}")
            again_hypotheses = decode_all(again, eval_x, settings.batch_size, device)
            rates.append(pooled_rate(edit_counts(eval_y, again_hypotheses), lengths))
        result.setdefault("seeds", {})[kind] = rates


def add_intervals(results: list[dict], seed: int) -> None:
    """``result["vs_first"][kind]``: the relative difference against the first upstream and its paired
    bootstrap 95 % interval (:mod:`.stats`), for every upstream after the first."""
    from s3prl_laser.probe.stats import holds_zero, paired_bootstrap

    first = results[0]
    for result in results[1:]:
        result["vs_first"] = {}
        for kind, scores in result["utterances"].items():
            reference = first["utterances"][kind]
            interval = paired_bootstrap(reference["edits"], scores["edits"], scores["ref_lengths"], seed=seed)
            relative = (result[kind] - first[kind]) / first[kind] if first[kind] else None
            result["vs_first"][kind] = {
                "relative": relative, "interval95": list(interval), "within_noise": holds_zero(interval)
            }  # fmt: skip


def upstream_label(text: str) -> str:
    """``text`` as the table shows it: a local checkpoint path made absolute, names kept as written."""
    from s3prl_laser.probe.features import UpstreamSpec

    _, _, ckpt = text.partition(":")
    return str(UpstreamSpec.parse(text)) if ckpt and Path(ckpt).expanduser().exists() else text


def run_base(cfg) -> str:
    """The run's base as a probe upstream: ``<upstream>:<ckpt>``, or ``<upstream>`` (s3prl's default)."""
    return f"{cfg.upstream}:{cfg.ckpt}" if cfg.ckpt else cfg.upstream


def check_probe_base(cfg, out: Path) -> None:
    """``probe: true``, at the start of a run: a base the probe cannot load is a ``UserInputError`` now
    (read once, converted in memory, nothing written), not after training."""
    from s3prl_laser.probe.bases import resolve_upstream

    try:
        resolve_upstream(run_base(cfg), out / "cache", write=False, option="probe=true: base")
    except UserInputError as error:
        raise UserInputError(f"{error} (the end-of-run probe loads it; set probe=false to skip it)") from None


def probe_tuned_and_base(cfg, tuned: Path, out: Path, device, show: bool = True) -> list[dict]:
    """``probe: true`` in a finetune run: the run's base first, the reference (``<upstream>:<ckpt>``: any
    ``--ckpt``, see :mod:`s3prl_laser.probe.bases`; s3prl's ``<upstream>_base`` without one), then the tuned
    upstream (``<upstream>_laser:tuned``), on ``cfg.data``, seed ``cfg.seed``.

    ``cfg`` is the run's :class:`~s3prl_laser.training.config.LaserConfig`; outputs go to ``out``.
    """
    base = run_base(cfg)
    logger.info("probe: %s_laser against its base %s on %s", cfg.upstream, base, cfg.data)
    settings = ProbeSettings(
        data=cfg.data,
        upstreams=[base, f"{cfg.upstream}_laser:{tuned}"],  # the base is the reference: "vs first"
        out=out,
        seed=cfg.seed,
        steps=cfg.probe_steps,
        device=str(device),
    )
    return run_probe(settings, show)
