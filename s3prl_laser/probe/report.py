"""The probe's outputs: a side-by-side table, the learned layer weights as a PNG, one JSON.

Example::

    >>> print(format_table(results))  # doctest: +SKIP
    upstream                     CER   vs first  95 % interval             PER ...
    hubert_laser:run/h.pt    31.20 %      (ref)
    hubert:base.pt           29.86 %     -4.3 %  [-8.1, -0.6] %
"""

from __future__ import annotations

import json
from pathlib import Path


def relative(value: float, first: float) -> str:
    return "" if first == 0 else f"{100 * (value - first) / first:+.1f} %"


def interval_text(result: dict, kind: str) -> str:
    """``[-8.1, -0.6] %`` (the 95 % interval of the relative difference), ``within noise`` when it holds 0."""
    entry = result.get("vs_first", {}).get(kind)
    if entry is None:
        return ""
    low, high = entry["interval95"]
    text = f"[{100 * low:+.1f}, {100 * high:+.1f}] %"
    return f"{text} within noise" if entry["within_noise"] else text


def format_table(results: list[dict]) -> str:
    """CER (and PER) per upstream in percent, with the relative change against the first upstream and its
    95 % interval (paired bootstrap over the evaluation utterances); lower is better."""
    kinds = [k for k in ("cer", "per") if all(k in r for r in results)]
    width = max(12, *(len(r["upstream"]) for r in results)) + 2
    notes = {k: [interval_text(r, k) for r in results] for k in kinds}
    spans = {k: max(len("95 % interval"), *(len(n) for n in notes[k])) for k in kinds}
    header = f"{'upstream':<{width}}" + "".join(
        f"{k.upper():>9}{'vs first':>11}  {'95 % interval':<{spans[k]}}" for k in kinds
    )
    lines = [header.rstrip()]
    for i, r in enumerate(results):
        changes = ["(ref)" if i == 0 else relative(r[k], results[0][k]) for k in kinds]
        cells = "".join(
            f"{100 * r[k]:>7.2f} %{change:>11}  {notes[k][i]:<{spans[k]}}"
            for k, change in zip(kinds, changes, strict=True)
        )
        lines.append(f"{r['upstream']:<{width}}{cells}".rstrip())
    lines.append(
        "lower is better; vs first: relative change against the first row, with its 95 % interval "
        f"(paired bootstrap over {len(results[0]['utterances'][kinds[0]]['edits'])} evaluation utterances)"
        if "utterances" in results[0] and kinds
        else "lower is better"
    )
    for r in results:
        for kind, rates in r.get("seeds", {}).items():
            lines.append(
                f"{r['upstream']}: {kind.upper()} over {len(rates)} seeds {100 * min(rates):.2f}-"
                f"{100 * max(rates):.2f} % (spread {100 * (max(rates) - min(rates)):.2f} points; the table "
                "shows the first seed)"
            )
    if len(results) == 1:
        lines.append(
            "one upstream: add the model to compare with, e.g. its base, as a second --upstream "
            "(hubert:BASE or wavlm:BASE: a checkpoint file, a transformers folder, a hub id or an s3prl name)"
        )
    return "\n".join(lines)


def plot_layer_weights(results: list[dict], path: Path) -> None:
    """One bar chart per target kind: the softmax layer weights each upstream's head learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("cer", "per") if all(k in r for r in results)]
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(6 * len(kinds), 3.6), constrained_layout=True, squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            weights = r["layer_weights"][kind]
            ax.bar([x + i * width for x in range(len(weights))], weights, width, label=r["upstream"])
        ax.set_title(f"learned layer weights ({'characters' if kind == 'cer' else 'phones'})")
        ax.set_xlabel("hidden layer (0 = CNN output)")
        ax.set_ylabel("softmax weight")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: list[dict], settings: dict, out: Path) -> dict[str, Path]:
    """``probe.json``, ``probe_layers.png`` and ``probe_table.txt`` in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probe.json", "png": out / "probe_layers.png", "table": out / "probe_table.txt"}
    paths["json"].write_text(json.dumps({"settings": settings, "upstreams": results}, indent=2))
    paths["table"].write_text(format_table(results) + "\n")
    plot_layer_weights(results, paths["png"])
    return paths
