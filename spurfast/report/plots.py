"""PNG figures of a memorization study's results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, Optional

import torch

from spurfast.attribution.trace import TraceResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(plt):
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_training(results: Dict, path: Path) -> Optional[Path]:
    """Training loss and per-group train/test accuracy against the epoch (first seed)."""
    history = results["runs"][0]["history"]
    if not history:
        return None
    plt = _pyplot()
    names = results["data"]["group_names"]
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(epochs, [h["loss"] for h in history], "-o", ms=3)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss", fontsize=9)
    for ax, split in zip(axes[1:], ("train", "test")):
        for g, color in zip(range(results["data"]["num_groups"]), _colors(plt)):
            values = [h[f"{split}_group_acc"][g] for h in history if f"{split}_group_acc" in h]
            ax.plot(epochs[: len(values)], values, "-", color=color, label=f"g{g} {names[g]}")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{split} accuracy per group (%)", fontsize=9)
    axes[2].legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trace(results: Dict, path: Path, split: str) -> Path:
    """Accuracy change per group against k, mean over seeds; one panel per (setting, target)."""
    merged: Dict[tuple, list] = {}
    for r in results["trace_rows"]:
        label = r["mode"] if r["sigma"] is None else f"{r['mode']} σ={r['sigma']}"
        key = (f"{label}, top-k of g{r['target']}", r["k"], r["units"], r["split"], r["group"])
        merged.setdefault(key, []).append(r["change_mean"])
    rows = [
        {"mode": mode, "sigma": None, "k": k, "units": units, "split": s, "group": group,
         "change_mean": statistics.fmean(v), "change_std": statistics.stdev(v) if len(v) > 1 else 0.0}
        for (mode, k, units, s, group), v in merged.items()
    ]
    return TraceResult(rows).plot(path, x="k", split=split)


def plot_oracle(results: Dict, path: Path) -> Optional[Path]:
    """Score against the measured drop when each unit is zeroed alone (first seed), per target."""
    oracle = results["runs"][0]["oracle"]
    if not oracle:
        return None
    plt = _pyplot()
    targets = list(oracle["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        o = oracle["targets"][target]
        drops = [oracle["drops"][u][int(target)] for u in o["ranked_units"]]
        specific = {b["unit"] for b in o["best_specific"]}
        colors = ["tab:red" if u in specific else "tab:blue" for u in o["ranked_units"]]
        score = results["runs"][0].get("score", "group_gradient")
        if score == "group_gradient":  # a norm spanning decades
            ax.scatter([max(s, 1e-12) for s in o["scores"]], drops, c=colors, s=14)
            ax.set_xscale("log")
        else:
            ax.scatter(o["scores"], drops, c=colors, s=14)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel(f"{score} score of g{target}" + (" (rank, largest first)" if score == "verified" else ""))
        ax.set_ylabel(f"g{target} train accuracy drop when zeroed alone (pts)")
        ax.set_title(f"g{target}: Spearman {o['spearman_score_vs_target_drop']:.2f}; red = group-specific", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_self_influence(results: Dict, train_group_ids: torch.Tensor, path: Path) -> Optional[Path]:
    """Histogram of log10 self-influence per group (first seed)."""
    si = results["runs"][0]["self_influence"]
    if not si:
        return None
    plt = _pyplot()
    influence = torch.tensor(si["influence"], dtype=torch.float64).clamp(min=1e-12).log10()
    names = results["data"]["group_names"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lo, hi = float(influence.min()), float(influence.max())
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 41).tolist()
    for g, color in zip(range(results["data"]["num_groups"]), _colors(plt)):
        values = influence[train_group_ids == g].tolist()
        if values:
            ax.hist(values, bins=bins, density=True, histtype="step", lw=1.5, color=color, label=f"g{g} {names[g]} (n={len(values)})")
    ax.set_xlabel("log10 self-influence (TracIn)")
    ax.set_ylabel("density")
    ax.set_title(f"minority vs majority AUROC {si['auroc_minority_vs_majority']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_top_samples(results: Dict, train_images: torch.Tensor, path: Path, per_unit: int = 8) -> Optional[Path]:
    """The training images each minority group's first unit holds most (first seed), with their groups."""
    si = results["runs"][0]["self_influence"]
    if not si:
        return None
    plt = _pyplot()
    units = [(t, u, v) for t, d in si["unit_restricted"].items() for u, v in list(d["top_samples"].items())[:1]]
    cols = min(per_unit, min(len(v["indices"]) for _, _, v in units))
    fig, axes = plt.subplots(len(units), cols, figsize=(1.3 * cols, 1.55 * len(units)), squeeze=False)
    for row, (target, unit, v) in zip(axes, units):
        for ax, index, group in zip(row, v["indices"][:cols], v["groups"][:cols]):
            image = train_images[index].detach().float().cpu()
            if image.dim() == 3:
                image = image.permute(1, 2, 0) if image.shape[0] in (1, 3) else image
            lo, hi = float(image.min()), float(image.max())
            image = (image - lo) / (hi - lo) if hi > lo else image * 0
            ax.imshow(image.squeeze(-1).numpy() if image.shape[-1] == 1 else image.numpy(), cmap="gray")
            ax.set_title(f"g{group}", fontsize=8, color="tab:red" if str(group) == target else "black")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{unit}\n(g{target})", fontsize=7)
    fig.suptitle("training samples that load each unit most (red = the unit's target group)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_framework(results: Dict, path: Path) -> Optional[Path]:
    """Test accuracy per group of each method of the "ERM vs framework" section, as grouped bars."""
    section = results.get("framework")
    if not section:
        return None
    plt = _pyplot()
    names = results["data"]["group_names"]
    methods = list(section["rows"])
    num_groups = results["data"]["num_groups"]
    width = 0.8 / num_groups
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(methods)), 3.6))
    for g, color in zip(range(num_groups), _colors(plt)):
        values = [section["rows"][m]["test_group_acc"][g] for m in methods]
        xs = [i + (g - (num_groups - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width, color=color, label=f"g{g} {names[g]}")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace("framework_", "framework\n") for m in methods], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy per group, seed {section['seed']}", fontsize=9)
    ax.legend(fontsize=7, ncol=num_groups, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(results: Dict, out_dir: Path, train_images: Optional[torch.Tensor] = None,
                 train_group_ids: Optional[torch.Tensor] = None) -> Dict[str, Path]:
    """Write every figure that the results support into ``out_dir``; ``{name: path}``."""
    out_dir = Path(out_dir)
    figures = {
        "training": plot_training(results, out_dir / "training.png"),
        "trace_train": plot_trace(results, out_dir / "trace_train.png", "train"),
        "trace_test": plot_trace(results, out_dir / "trace_test.png", "test"),
        "oracle": plot_oracle(results, out_dir / "oracle.png"),
    }
    if train_group_ids is not None:
        figures["self_influence"] = plot_self_influence(results, train_group_ids, out_dir / "self_influence.png")
    if train_images is not None:
        figures["top_samples"] = plot_top_samples(results, train_images, out_dir / "top_samples.png")
    figures["framework"] = plot_framework(results, out_dir / "framework.png")
    if results.get("rare"):
        from spurfast.report.rare import plot_score_vs_n  # it draws with this module's helpers

        figures["rare"] = plot_score_vs_n(results["rare"], out_dir / "rare_score_vs_n.png")
    return {k: v for k, v in figures.items() if v is not None}
