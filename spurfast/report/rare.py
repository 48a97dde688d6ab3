"""Outputs of the rare-pattern studies (:mod:`spurfast.experiments.rare`): the score-vs-n figure and the run folder.

* :func:`plot_score_vs_n` -- the spurious score against the number of poisoned images (log x,
  the n = 0 control to the left), one line per pattern with a ± std band over seeds, one panel
  per (dataset, model).
* :func:`write_rare_run` -- ``results.json``, ``runs.csv``, ``results.md`` and ``score_vs_n.png``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from spurfast.experiments.rare import as_studies, markdown_tables, summarize, write_csv
from spurfast.report.plots import _colors, _pyplot
from spurfast.report.study import json_safe

__all__ = ["plot_score_vs_n", "write_rare_run", "rare_markdown"]

_DATA_NAMES = {"fashion": "Fashion-MNIST", "synth": "SynthWaterbirds"}


def plot_score_vs_n(results, path: Union[str, Path]) -> Path:
    """Spurious score (mean ± std over seeds) against n, per pattern; one panel per (data, model).

    ``results``: a study of :func:`~spurfast.experiments.rare.run_rare_study`, a list of them or
    ``{"studies": [...]}``. The x axis is logarithmic; n = 0, the control trained on clean data,
    sits at a third of the smallest positive n, labelled "0 (control)" and joined by a dotted line.

    Example::

        >>> import os, tempfile
        >>> runs = [{"pattern": "S3", "n": n, "seed": 0, "spurious_score": v, "test_acc": 0.9, "pattern_l2": 4.7,
        ...          "poisoned_train_acc": None, "seconds": 1.0} for n, v in ((0, 0.0), (10, 0.2), (100, 0.6))]
        >>> study = {"config": {"data": "fashion", "model": "mlp", "ns": [0, 10, 100], "patterns": ["S3"],
        ...                     "seeds": [0], "target_class": 0}, "runs": runs}
        >>> plot_score_vs_n(study, os.path.join(tempfile.mkdtemp(), "score.png")).stat().st_size > 1000
        True
    """
    studies = as_studies(results)
    if not studies:
        raise ValueError("results hold no study to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 3.6), squeeze=False)
    for ax, study in zip(axes[0], studies):
        cfg = study["config"]
        positive = sorted(n for n in cfg["ns"] if n > 0)
        control_x = positive[0] / 3 if positive else 1.0
        rows = {(r["pattern"], r["n"]): r for r in summarize(study)}
        for pattern, color in zip(cfg["patterns"], _colors(plt) * 4):
            ns = [n for n in cfg["ns"] if (pattern, n) in rows]
            mean = [rows[(pattern, n)]["spurious_score"]["mean"] for n in ns]
            std = [rows[(pattern, n)]["spurious_score"]["std"] for n in ns]
            l2 = rows[(pattern, ns[0])]["pattern_l2"]["mean"]
            xs = [control_x if n == 0 else n for n in ns]
            split = 1 if ns and ns[0] == 0 else 0
            ax.plot(xs[split:], mean[split:], "-o", ms=4, color=color, label=f"{pattern} (l2 {l2:.1f})")
            if split:
                ax.plot(xs[:2], mean[:2], ":", color=color)
                ax.errorbar(xs[:1], mean[:1], yerr=std[:1], fmt="s", ms=5, color=color, mfc="white", capsize=3)
            ax.fill_between(xs[split:], [m - s for m, s in zip(mean[split:], std[split:])],
                            [m + s for m, s in zip(mean[split:], std[split:])], color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ticks = ([control_x] if 0 in cfg["ns"] else []) + positive
        ax.set_xticks(ticks)
        ax.set_xticklabels((["0\n(control)"] if 0 in cfg["ns"] else []) + [str(n) for n in positive], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"poisoned images of class {cfg['target_class']}")
        ax.set_ylabel("spurious score")
        arch = "MLP" if cfg["model"] == "mlp" else "SmallCNN"
        seeds = len(cfg["seeds"])
        ax.set_title(f"{_DATA_NAMES.get(cfg['data'], cfg['data'])}, {arch} ({seeds} seed{'s' * (seeds != 1)})",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rare_markdown(results) -> str:
    """Every study's :func:`~spurfast.experiments.rare.markdown_tables`, one after the other."""
    return "\n\n".join(markdown_tables(study) for study in as_studies(results))


def write_rare_run(results: Mapping[str, Any], out_dir: Union[str, Path], *,
                   meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Write ``results.json`` (strict JSON, ``meta`` under ``"meta"``), ``runs.csv``, ``results.md``
    and ``score_vs_n.png`` into ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "csv": out / "runs.csv", "markdown": out / "results.md",
             "figure": out / "score_vs_n.png"}
    document = dict(results, meta=dict(meta or {}))
    paths["results"].write_text(json.dumps(json_safe(document), indent=1, allow_nan=False) + "\n")
    write_csv(results, paths["csv"])
    paths["markdown"].write_text(rare_markdown(results) + "\n")
    plot_score_vs_n(results, paths["figure"])
    return paths
