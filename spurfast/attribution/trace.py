"""Per-group accuracy before and after interventions on localized units, against a random control.

:func:`trace` answers "what happens to each group if I touch these neurons?": for every
intervention mode, sigma and number of units k, it measures per-group accuracy on each
split (train and test, typically) after intervening on the top-k units, and after the same
intervention on a *random control* of the same size and layer distribution, over
``repeats`` seeded draws. The result is a :class:`TraceResult`: a flat table (one row per
mode x sigma x k x selected/random x split x group) that writes itself as JSON, CSV or
Markdown and plots the accuracy change per group against k or sigma.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from spurfast.attribution.interventions import MODES, intervene, random_units_like
from spurfast.metrics import group_accuracy
from spurfast.attribution.scores import _as_units, as_tensors, predict_logits, scoring_state

_RANDOM_MODES = ("random_init", "random_noise")
COLUMNS = (
    "mode", "sigma", "k", "units", "split", "group", "n", "draws",
    "acc_before", "acc_after_mean", "acc_after_std", "change_mean", "change_std", "unit_list",
)


class TraceResult:
    """The table produced by :func:`trace`; accuracies are fractions in [0, 1].

    ``rows``: list of dicts with keys :data:`COLUMNS`: ``units`` is ``"selected"`` or
    ``"random"`` (the control); ``change_*`` is after minus before (negative = a drop);
    ``*_std`` is the sample standard deviation over ``draws`` (0 for one draw);
    ``unit_list`` names the selected units (``layer:channel;...``).
    """

    def __init__(self, rows: List[Dict[str, object]]):
        self.rows = rows

    def select(self, **where) -> List[Dict[str, object]]:
        """Rows whose columns equal the given values, e.g. ``select(split="train", group=1)``."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in where.items())]

    def to_json(self, path) -> pathlib.Path:
        """Write the rows as a JSON list (NaN, e.g. an empty group's accuracy, as null)."""
        path = pathlib.Path(path)
        path.write_text(json.dumps(_nan_to_none(self.rows), indent=1))
        return path

    def to_csv(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_markdown(self, split: Optional[str] = None) -> str:
        """Markdown table of the changes in accuracy points (mean +- std over draws)."""
        head = "| mode | sigma | k | units | split | group | before | change (points) | draws |"
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            if split is not None and r["split"] != split:
                continue
            lines.append(
                f"| {r['mode']} | {r['sigma'] if r['sigma'] is not None else '-'} | {r['k']} | {r['units']} | "
                f"{r['split']} | {r['group']} | {100 * r['acc_before']:.1f} | "
                f"{100 * r['change_mean']:+.1f} ± {100 * r['change_std']:.1f} | {r['draws']} |"
            )
        return "\n".join(lines)

    def plot(self, path, x: str = "k", split: str = "train", mode: Optional[str] = None, fixed=None) -> pathlib.Path:
        """PNG of the accuracy change per group (points) against ``x`` (``"k"`` or ``"sigma"``).

        One panel per mode (or only ``mode``); solid lines are the selected units, dashed the
        random control, error bars one std over draws. ``fixed`` holds the other variable
        (default: the first sigma when ``x="k"``, the largest k when ``x="sigma"``). Needs
        matplotlib (a dependency of spurfast).
        """
        if x not in ("k", "sigma"):
            raise ValueError(f"x must be 'k' or 'sigma', got {x!r}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("TraceResult.plot needs matplotlib: pip install matplotlib") from e
        rows = [r for r in self.rows if r["split"] == split]
        if not rows:
            raise ValueError(f"split: no rows for split {split!r}")
        modes = [mode] if mode is not None else list(dict.fromkeys(r["mode"] for r in rows))
        other = "sigma" if x == "k" else "k"
        fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, m in zip(axes[0], modes):
            mrows = [r for r in rows if r["mode"] == m]
            if not mrows:
                raise ValueError(f"mode: no rows for mode {m!r}")
            values = [r[other] for r in mrows]
            if fixed is not None:
                hold = fixed
            elif x == "k":
                hold = values[0]
            else:
                hold = max(values)
            mrows = [r for r in mrows if r[other] == hold]
            if x == "sigma" and any(r["sigma"] is None for r in mrows):
                raise ValueError(f"x='sigma' needs a random mode; {m!r} has no sigma")
            for gi, group in enumerate(sorted({r["group"] for r in mrows})):
                for kind, style in (("selected", "-o"), ("random", "--s")):
                    pts = sorted((r[x], r["change_mean"], r["change_std"]) for r in mrows
                                 if r["group"] == group and r["units"] == kind)
                    if not pts:
                        continue
                    ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                                fmt=style, color=colors[gi % len(colors)], capsize=3,
                                label=f"group {group} ({kind})", alpha=1.0 if kind == "selected" else 0.6)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xlabel(x)
            if x == "sigma":
                ax.set_xscale("log")
            ax.set_ylabel(f"{split} accuracy change (points)")
            ax.set_title(m if hold is None else f"{m} ({other}={hold})", fontsize=9)
            if x == "k":
                ax.set_xticks(sorted({r["k"] for r in mrows}))
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = pathlib.Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _nan_to_none(rows):
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def _std(values: List[float]) -> float:
    if len(values) < 2:
        return 0.0
    return float(torch.tensor(values, dtype=torch.float64).std())


def _evaluate(model, data, num_groups: int, batch_size: int) -> Dict[str, List[float]]:
    out = {}
    for split, (x, y, g) in data.items():
        preds = predict_logits(model, x, batch_size).argmax(-1)
        out[split] = group_accuracy(preds, y, g, num_groups).group_acc.tolist()
    return out


def trace(
    model: nn.Module,
    units: Sequence,
    loaders: Mapping[str, object],
    modes: Sequence[str] = ("random_init",),
    sigmas: Sequence[Union[None, float, str]] = ("init",),
    repeats: int = 10,
    *,
    ks: Optional[Sequence[int]] = None,
    num_groups: Optional[int] = None,
    control: bool = True,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    bias: bool = False,
    seed: int = 0,
    batch_size: int = 512,
) -> TraceResult:
    """Per-group accuracy before/after intervening on ``units`` (and on random controls).

    Args:
        model: the trained model; evaluated in eval mode, left exactly as found.
        units: ranked ``(layer, channel)`` units, best first (e.g. from
            :func:`spurfast.attribution.localize`); intervention k uses ``units[:k]``.
        loaders: ``{split name: dataset}`` (anything :func:`spurfast.attribution.scores.as_tensors`
            accepts), e.g. ``{"train": train_set, "test": test_set}``.
        modes: intervention modes (``"unstructured"`` is not unit-based and not traced here).
        sigmas: for random modes, each sigma (float or ``"init"``) is a separate setting;
            deterministic modes run once with ``sigma=None``.
        repeats: draws per setting: seeds ``seed + r``. Deterministic modes on the selected
            units are evaluated once (every draw would be the same); the random control always
            draws ``repeats`` unit sets (each avoiding all of ``units[:k]``).
        ks: numbers of units to try (default ``[len(units)]``).
        num_groups: default: 1 + the largest group id in ``loaders``.
        control: also run the random-units control.
        reference: state dict for ``rewind``/``layer_rewind``.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as T
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> data = (torch.randn(20, 4), torch.randint(0, 2, (20,)), torch.arange(20) % 2)
        >>> result = T.trace(model, [("0", 1)], {"train": data}, modes=["zero"], repeats=2)
        >>> sorted({(r["units"], r["draws"]) for r in result.rows})
        [('random', 2), ('selected', 1)]
    """
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: unknown mode {m!r}; expected one of {MODES}")
        if m == "unstructured":
            raise ValueError("modes: 'unstructured' takes masks, not units; use spurfast.attribution.intervene")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    units = _as_units(units)
    if not units:
        raise ValueError("units must not be empty")
    ks = [len(units)] if ks is None else list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(units):
            raise ValueError(f"ks: each k must be an int in [1, {len(units)}], got {k!r}")
    if not isinstance(loaders, Mapping) or not loaders:
        raise ValueError("loaders must be a non-empty dict {split name: dataset}")
    data = {split: as_tensors(ds, f"loaders[{split!r}]") for split, ds in loaders.items()}
    if num_groups is None:
        num_groups = 1 + max(int(g.max()) for _, _, g in data.values() if g.numel())
    counts = {split: torch.bincount(g, minlength=num_groups).tolist() for split, (_, _, g) in data.items()}
    rows: List[Dict[str, object]] = []
    with scoring_state(model):
        before = _evaluate(model, data, num_groups, batch_size)

        def run(selection, mode, sigma, draw_seed):
            with intervene(model, selection, mode, sigma=sigma, reference=reference, seed=draw_seed, bias=bias):
                return _evaluate(model, data, num_groups, batch_size)

        for mode in modes:
            mode_sigmas = list(sigmas) if mode in _RANDOM_MODES else [None]
            for sigma in mode_sigmas:
                for k in ks:
                    chosen = units[:k]
                    runs = {"selected": [], "random": []}
                    draws = repeats if mode in _RANDOM_MODES else 1
                    for r in range(draws):
                        runs["selected"].append(run(chosen, mode, sigma, seed + r))
                    if control:
                        for r in range(repeats):
                            generator = torch.Generator().manual_seed(seed + r)
                            random_units = random_units_like(model, chosen, generator, avoid=chosen)
                            runs["random"].append(run(random_units, mode, sigma, seed + r))
                    unit_list = ";".join(f"{u.layer}:{u.channel}" for u in chosen)
                    for kind, results in runs.items():
                        if not results:
                            continue
                        for split in data:
                            for group in range(num_groups):
                                after = [res[split][group] for res in results]
                                base = before[split][group]
                                mean_after = sum(after) / len(after)
                                rows.append({
                                    "mode": mode, "sigma": sigma, "k": k, "units": kind, "split": split,
                                    "group": group, "n": counts[split][group], "draws": len(after),
                                    "acc_before": base, "acc_after_mean": mean_after, "acc_after_std": _std(after),
                                    "change_mean": mean_after - base, "change_std": _std(after),
                                    "unit_list": unit_list,
                                })
    return TraceResult(rows)
