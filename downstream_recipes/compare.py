"""Collect SUPERB ``result.json`` files into a markdown table and a bar chart, beside the paper's numbers.

Each ``result.json`` (written by ``superb_asr.sh`` / ``superb_pr.sh``) is
``{"task": "ASR"|"PR", "upstream": NAME, "metric": "WER"|"PER", "value": percent}``. The upstream name
gives the row: ``hubert*`` -> HuBERT, ``wavlm*`` -> WavLM, ``wav2vec2*``/``xls_r*`` -> wav2vec 2.0,
``data2vec*`` -> data2vec (no paper numbers for the last two); names ending in ``_laser`` are the
LASER-tuned model, the others the base model. Lower is better for both metrics.

Command line (files, or folders searched recursively for ``result.json``)::

    python downstream_recipes/compare.py runs/superb_* --out runs/comparison
    # -> runs/comparison/comparison.md, runs/comparison/comparison.png

Example::

    >>> rows = collect([{"task": "ASR", "upstream": "hubert_laser", "metric": "WER", "value": 6.1}])
    >>> rows[("HuBERT", "ASR")]["LASER"]
    6.1
"""

import argparse
import json
import math
import sys
from pathlib import Path

from recipe_env import require_modules  # this script's folder

# The paper's SUPERB results (Meghanani & Hain, Interspeech 2024; percent, lower is better).
PAPER = {
    ("HuBERT", "PR"): {"base": 5.41, "LASER": 4.97},
    ("HuBERT", "ASR"): {"base": 6.42, "LASER": 6.18},
    ("WavLM", "PR"): {"base": 4.84, "LASER": 4.28},
    ("WavLM", "ASR"): {"base": 6.21, "LASER": 5.92},
}
METRICS = {"PR": "PER", "ASR": "WER"}
VARIANTS = ("base", "LASER")


# s3prl name prefix -> row title (XLS-R is wav2vec 2.0; the paper has rows for the first two only)
FAMILIES = (("hubert", "HuBERT"), ("wavlm", "WavLM"), ("wav2vec2", "wav2vec 2.0"), ("xls_r", "wav2vec 2.0"),
            ("xlsr", "wav2vec 2.0"), ("data2vec", "data2vec"))  # fmt: skip


def model_of(upstream: str) -> tuple[str, str]:
    """``(family, variant)`` of an s3prl upstream name, e.g. ``wavlm_laser`` -> ``("WavLM", "LASER")``."""
    name = upstream.lower()
    family = next((title for prefix, title in FAMILIES if name.startswith(prefix)), upstream)
    return family, "LASER" if name.endswith("_laser") else "base"


def read_results(paths: list[str | Path]) -> list[dict]:
    """Load result.json files; a folder stands for every ``result.json`` below it."""
    files = []
    for path in map(Path, paths):
        found = sorted(path.rglob("result.json")) if path.is_dir() else [path]
        if not found:
            raise ValueError(f"no result.json under {path}")
        files += found
    results = []
    for file in files:
        result = json.loads(file.read_text())
        missing = {"task", "upstream", "metric", "value"} - set(result)
        if missing or result["task"] not in METRICS or result["metric"] != METRICS[result["task"]]:
            raise ValueError(
                f"{file}: expected a SUPERB result.json ({{task: ASR|PR, upstream, metric, value}})"
            )
        results.append(result)
    return results


def collect(results: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(family, task): {variant: value}}``; two results for the same cell raise ``ValueError``."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for result in results:
        family, variant = model_of(result["upstream"])
        cell = rows.setdefault((family, result["task"]), {})
        if variant in cell:
            raise ValueError(
                f"two {variant} results for {family} {result['task']}; pass one per model and task"
            )
        cell[variant] = float(result["value"])
    return rows


def relative_change(base: float | None, laser: float | None) -> float | None:
    """LASER's change relative to base, in percent (negative = fewer errors)."""
    if base is None or laser is None or base == 0:
        return None
    return 100.0 * (laser - base) / base


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.1f} %" if signed else f"{value:.2f}"


def markdown_table(rows: dict[tuple[str, str], dict[str, float]]) -> str:
    """One line per (model, task): ours and the paper's base/LASER values and relative changes."""
    lines = [
        "| model | task | metric | base (ours) | LASER (ours) | change (ours) "
        "| base (paper) | LASER (paper) | change (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (family, task), ours in sorted(rows.items()):
        paper = PAPER.get((family, task), {})
        cells = [
            family,
            task,
            f"{METRICS[task]} %",
            _fmt(ours.get("base")),
            _fmt(ours.get("LASER")),
            _fmt(relative_change(ours.get("base"), ours.get("LASER")), signed=True),
            _fmt(paper.get("base")),
            _fmt(paper.get("LASER")),
            _fmt(relative_change(paper.get("base"), paper.get("LASER")), signed=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: dict[tuple[str, str], dict[str, float]], path: Path) -> Path:
    """Grouped bars per (model, task): base and LASER, ours solid, the paper's hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(rows)
    series = [(source, variant) for source in ("ours", "paper") for variant in VARIANTS]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.2 * len(keys) + 2, 4))
    for index, (source, variant) in enumerate(series):
        table = rows if source == "ours" else PAPER
        values = [table.get(key, {}).get(variant, math.nan) for key in keys]
        ax.bar(
            [k + (index - (len(series) - 1) / 2) * width for k in range(len(keys))],
            values,
            width,
            label=f"{variant} ({source})",
            color="tab:blue" if variant == "base" else "tab:orange",
            hatch="//" if source == "paper" else None,
            alpha=1.0 if source == "ours" else 0.5,
        )
    ax.set_xticks(range(len(keys)), [f"{family}\n{task} ({METRICS[task]})" for family, task in keys])
    ax.set_ylabel("error rate, % (lower is better)")
    ax.set_title("SUPERB: base vs LASER")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tabulate and plot SUPERB result.json files vs the paper.")
    parser.add_argument("results", nargs="+", help="result.json files or folders holding them")
    parser.add_argument("--out", required=True, type=Path, help="folder for comparison.md and comparison.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    require_modules("downstream_recipes/compare.py", ("matplotlib",))
    args = get_args_parser().parse_args(argv)
    try:
        rows = collect(read_results(args.results))
    except ValueError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(table)
    chart = bar_chart(rows, args.out / "comparison.png")
    print(table + f"\nwritten: {args.out / 'comparison.md'}, {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
