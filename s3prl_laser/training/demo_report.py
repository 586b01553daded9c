"""The ``--demo`` before/after report: what LASER does to the clean and perturbed views of held-out clips.

The held-out clips are the corpus' ``dev-clean`` and ``test-clean`` splits. Before and after tuning it
measures the metrics of :mod:`s3prl_laser.training.heldout` (the same code path as the validation during
training): the same-clip / other-clip divergence ratio in the projection space and in the upstream's last
layer, and the far-frame collapse guard.

It also draws the expected alignment matrix ``E = d sdtw / d C`` between the two views of the first clip
(projection space), before and after. Both upstreams are measured as a SUPERB downstream sees them, loaded
through s3prl's public ``S3PRLUpstream``: "before" is the base checkpoint through s3prl's stock
``<upstream>_local``, "after" the written ``<upstream>_laser.pt`` through this package's ``<upstream>_laser``
entry. The report also records how far the latter's last layer is from the model training left in memory.
Outputs: a table on stdout, ``OUT/demo_report.json`` and ``OUT/demo_alignment.png``. Each phase (views of
the held-out clips, the check of the written upstream, each measurement, the picture) is logged as it starts,
with the seconds the previous one took, so that the screen never sits silent for long.

Example::

    >>> report = demo_report(cfg, before, after, out, tuned_model)  # doctest: +SKIP
    >>> report["after"]["divergence_ratio_projection"], report["before"]["divergence_ratio_projection"]
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from s3prl_laser.data import find_audio
from s3prl_laser.softdtw import pairwise_sq_dist, soft_dtw_from_cost
from s3prl_laser.training.config import LaserConfig
from s3prl_laser.training.heldout import METRICS, Pair, embed, eval_mode, make_pairs, measure

HELD_OUT_SPLITS = ("dev-clean", "test-clean")
logger = logging.getLogger("s3prl_laser.report")


class PhaseLog:
    """``next(what)``: logs ``report: WHAT`` and the seconds the previous phase took."""

    def __init__(self) -> None:
        self.started = None

    def next(self, what: str) -> None:
        now = time.perf_counter()
        took = "" if self.started is None else f" (previous step: {now - self.started:.1f} s)"
        logger.info("report: %s%s", what, took)
        self.started = now


def held_out_pairs(cfg: LaserConfig) -> list[Pair]:
    """``(path, clean [T], perturbed [T'])`` for the first ``report_clips`` held-out clips."""
    return make_pairs(find_audio(cfg.data, HELD_OUT_SPLITS)[: cfg.report_clips], cfg)


def expected_alignment(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """``E = d sdtw(x, y) / d C`` for ``x [N, D]``, ``y [M, D]``: ``[N, M]``, each cell in ``[0, 1]``."""
    cost = pairwise_sq_dist(x[None], y[None]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_dtw_from_cost(cost, gamma=gamma).sum(), cost)
    return grad[0].cpu()


def first_pair_alignment(base: nn.Module, head: nn.Module, pairs: list[Pair], gamma: float) -> torch.Tensor:
    """``E`` between the projections of the two views of the first pair (call in eval mode)."""
    _, clean, perturbed = pairs[0]
    (_, z1), (_, z2) = embed(base, head, clean), embed(base, head, perturbed)
    return expected_alignment(z1, z2, gamma)


def plot_alignments(before: torch.Tensor, after: torch.Tensor, path: Path, title: str) -> None:
    """Two heat maps of ``E`` side by side (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    for ax, matrix, name in zip(axes, (before, after), ("before tuning", "after tuning"), strict=True):
        image = ax.imshow(matrix.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_title(f"expected alignment E = ∂sdtw/∂C, {name}", fontsize=10)
        ax.set_xlabel("perturbed view: frame")
        ax.set_ylabel("clean view: frame")
    fig.colorbar(image, ax=axes, shrink=0.85, label="alignment probability")
    fig.suptitle(
        f"{title}\nbetter alignment: a thin, bright diagonal (each frame of one view matched to the same "
        "moment of the other), not a blur",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


# which direction is better, for each metric of the report (the raw divergences say why they grow instead)
READING = {
    "divergence_ratio_upstream": "lower is better: one clip's views closer than two clips'",
    "divergence_ratio_projection": "lower is better",
    "far_distance_upstream": "collapse guard: must stay well above 0",
    "far_distance_projection": "collapse guard: must stay well above 0",
    "divergence_projection": "raw: grows as training spreads the frames; read the ratio",
    "divergence_other_projection": "raw: the scale the ratio divides by",
}
ORDER = ("divergence_ratio_upstream", "divergence_ratio_projection", "far_distance_upstream",
         "far_distance_projection", "divergence_projection", "divergence_other_projection")  # fmt: skip


def probe_row(probe: list[dict]) -> tuple[str, str, str, str] | None:
    """``(label, base CER, tuned CER, reading)`` from the probe's results (base first, then the tuned
    upstream, whose ``vs_first`` holds the relative change and its 95 % interval); None without a CER."""
    if len(probe) < 2 or "cer" not in probe[-1] or "vs_first" not in probe[-1]:
        return None
    base, tuned = probe[0], probe[-1]
    entry = tuned["vs_first"]["cer"]
    low, high = entry["interval95"]
    change = "" if entry["relative"] is None else f"{100 * entry['relative']:+.1f} %, "
    verdict = "within noise" if entry["within_noise"] else ("better" if high < 0 else "worse")
    reading = f"lower is better: {change}95 % interval [{100 * low:+.1f}, {100 * high:+.1f}] %, {verdict}"
    clips = len(tuned.get("utterances", {}).get("cer", {}).get("edits", []))
    label = f"CTC probe CER ({clips} dev-clean clips)" if clips else "CTC probe CER"
    return label, f"{100 * base['cer']:.2f} %", f"{100 * tuned['cer']:.2f} %", reading


def format_table(report: dict) -> str:
    """The answer first (the probe's CER with its interval, the same/other ratio), each row saying which
    direction is better; the raw divergences last, saying why they grow."""
    lines = [
        f"LASER demo: did tuning help? {report['clips']} held-out clips ({', '.join(HELD_OUT_SPLITS)}), "
        "clean vs perturbed view of each",
        f"{'metric':<44}{'before':>10}{'after':>10}  reading",
    ]
    row = probe_row(report.get("probe") or [])
    if row is not None:
        lines.append(f"{row[0]:<44}{row[1]:>10}{row[2]:>10}  {row[3]}")
    for key in ORDER:
        lines.append(
            f"{METRICS[key]:<44}{report['before'][key]:>10.4f}{report['after'][key]:>10.4f}  {READING[key]}"
        )
    return "\n".join(lines)


class S3prlLastLayer(nn.Module):
    """The last hidden state of an upstream loaded through s3prl's public API, ``S3PRLUpstream(name, ckpt)``.

    ``forward(wavs [B, T], lengths [B]) -> (hidden [B, F, C], frames [B])``, the interface of
    ``s3prl_laser.models.upstream.BaseModel.forward``, so the report measures it like the training model.
    """

    def __init__(self, name: str, ckpt: Path) -> None:
        super().__init__()
        from s3prl.nn import S3PRLUpstream

        from s3prl_laser.plugin.registration import register

        register()  # already done by the start-up hook when the package is installed; idempotent
        self.name, self.ckpt = name, Path(ckpt)
        self.upstream = S3PRLUpstream(name, path_or_url=str(ckpt))

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, hidden_lengths = self.upstream(wavs, lengths)
        return hidden_states[-1], hidden_lengths[-1]


@torch.no_grad()
def last_layer_gap(reference: nn.Module, loaded: S3prlLastLayer, pairs) -> float:
    """Max ``|reference - loaded|`` over the last-layer frames of the held-out clean clips (eval mode)."""
    device = next(reference.parameters()).device
    gap = 0.0
    for _, clean, _ in pairs:
        wav, length = clean[None].to(device), torch.tensor([clean.shape[-1]], device=device)
        ours, frames = reference(wav, length)
        theirs, _ = loaded(wav, length)
        n = min(int(frames[0]), theirs.shape[1])
        gap = max(gap, float((ours[0, :n] - theirs[0, :n]).abs().max()))
    return gap


def demo_report(
    cfg: LaserConfig,
    before: tuple[S3prlLastLayer, nn.Module],
    after: tuple[S3prlLastLayer, nn.Module],
    out: Path,
    tuned_in_memory: nn.Module,
    probe: list[dict] | None = None,
) -> dict:
    """Measure ``before`` and ``after`` (each ``(upstream through s3prl, head)``); print, write JSON and PNG.

    ``tuned_in_memory`` is the upstream as training left it; ``after``'s upstream must reproduce it.
    ``probe``: the results of :func:`s3prl_laser.probe.runner.run_probe` (``probe: true``), shown and kept.
    """
    phases = PhaseLog()
    pairs, gap, results, alignments = measure_both(cfg, before, after, tuned_in_memory, phases)
    report = report_of(cfg, pairs, results, before, after, gap, probe)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    phases.next(f"drawing {out / 'demo_alignment.png'}")
    title = f"{Path(pairs[0][0]).name}: clean vs perturbed view, {cfg.upstream} projection space"
    plot_alignments(alignments["before"], alignments["after"], out / "demo_alignment.png", title)
    phases.next("done")
    show_report(cfg, report, before, after, gap, out, probe)
    return report


def measure_both(cfg: LaserConfig, before, after, tuned_in_memory: nn.Module, phases: PhaseLog):
    """The held-out pairs, how far the written upstream (through s3prl) is from the model in memory, and the
    metrics and first pair's alignment of the models before and after tuning: ``(pairs, gap, results,
    alignments)``."""
    phases.next(f"clean and perturbed views of {cfg.report_clips} held-out clips")
    pairs = held_out_pairs(cfg)
    if not pairs:
        raise ValueError(f"no usable held-out clip in {cfg.data} ({', '.join(HELD_OUT_SPLITS)})")
    loaded = after[0]
    phases.next(f"the written {loaded.name} through s3prl vs the model in memory")
    with eval_mode(tuned_in_memory, loaded):
        gap = last_layer_gap(tuned_in_memory, loaded, pairs)
    results, alignments = {}, {}
    for name, (base, head) in (("before", before), ("after", after)):
        phases.next(f"measuring the model {name} tuning ({base.name})")
        with eval_mode(base, head):
            results[name] = measure(base, head, pairs, cfg.gamma)
            alignments[name] = first_pair_alignment(base, head, pairs, cfg.gamma)
    return pairs, gap, results, alignments


def report_of(cfg: LaserConfig, pairs: list, results: dict, before, after, gap: float,
              probe: list[dict] | None) -> dict:  # fmt: skip
    """The report's JSON: the clips, the metrics before and after, how each upstream was loaded, what each
    metric means, and the probe's figures when there are some."""
    loaded = after[0]
    report = {
        "clips": len(pairs),
        "paths": [path for path, _, _ in pairs],
        "gamma": cfg.gamma,
        "steps": cfg.steps,
        "before": results["before"],
        "after": results["after"],
        "through_s3prl": {
            "before": {"upstream": before[0].name, "ckpt": str(before[0].ckpt)},
            "after": {"upstream": loaded.name, "ckpt": str(loaded.ckpt)},
            "after_vs_tuned_in_memory_max_abs_diff": gap,
        },
        "notes": {
            "divergence": "soft-DTW divergence sdtw(x,y) - (sdtw(x,x) + sdtw(y,y))/2 between the views",
            "other clip": "clean view of clip i vs perturbed view of clip i+1: the scale of unrelated speech",
            "ratio": "same-clip / other-clip divergence: scale-free; lower = views of one clip closer",
            "far_distance": "mean distance of frames >= half a clip apart (collapse guard: 0 = collapsed)",
            "upstream": "upstream last-layer frames are L2-normalised before measuring",
        },
    }
    if probe is not None:
        keep = ("upstream", "name", "ckpt", "cer", "per", "vs_first")
        report["probe"] = [{k: r[k] for k in keep if k in r} for r in probe]
        report["probe_utterances"] = len(probe[-1].get("utterances", {}).get("cer", {}).get("edits", []))
    return report


def show_report(cfg: LaserConfig, report: dict, before, after, gap: float, out: Path,
                probe: list[dict] | None) -> None:  # fmt: skip
    """The report's table on the screen, how each upstream was loaded, where the files are, what to run
    next."""
    loaded = after[0]
    print(format_table({**report, "probe": probe} if probe is not None else report))
    print(
        f"upstreams loaded through s3prl: before = S3PRLUpstream({before[0].name!r}, {before[0].ckpt}), "
        f"after = S3PRLUpstream({loaded.name!r}, {loaded.ckpt});\nthe latter's last layer vs the tuned model "
        f"in memory: max |diff| = {gap:.1e}"
    )
    if probe is not None:
        probe_out = out / "probe"
        print(f"probe: {probe_out / 'probe_table.txt'} (CER per upstream), {probe_out / 'probe.json'}")
    print(f"report: {out / 'demo_report.json'}, picture: {out / 'demo_alignment.png'}")
    print(
        f"next, on your own data: python -m s3prl_laser.finetune --upstream {cfg.upstream} "
        f"--data /data/LibriSpeech --out runs/{cfg.upstream} probe=true  (docs/training.md)"
    )
