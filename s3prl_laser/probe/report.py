"""The probe's outputs: a side-by-side table, the learned layer weights as a PNG, one JSON.

Example::

    >>> print(format_table(results))  # doctest: +SKIP
    upstream                      CER      vs first   PER      vs first
    hubert_laser:run/h.pt         31.20 %  -4.3 %     ...
"""

from __future__ import annotations

import json
from pathlib import Path


def relative(value: float, first: float) -> str:
    return "" if first == 0 else f"{100 * (value - first) / first:+.1f} %"


def format_table(results: list[dict]) -> str:
    """CER (and PER) per upstream in percent, with the relative change against the first upstream."""
    kinds = [k for k in ("cer", "per") if all(k in r for r in results)]
    width = max(12, *(len(r["upstream"]) for r in results)) + 2
    header = f"{'upstream':<{width}}" + "".join(f"{k.upper():>9}{'vs first':>11}" for k in kinds)
    lines = [header]
    for r in results:
        cells = "".join(f"{100 * r[k]:>7.2f} %{relative(r[k], results[0][k]):>11}" for k in kinds)
        lines.append(f"{r['upstream']:<{width}}{cells}")
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
