"""An ERM study: train a model by ERM with several seeds, evaluate every group, summarise, tabulate.

* :class:`ERMRecipe` -- one configuration: which model (``"efficientnet_lite0"``, ImageNet-pretrained
  and fine-tuned, or ``"small_cnn"`` from scratch), its input normalisation and its ERM settings.
* :func:`build_model` -- the recipe's model, with a fixed :class:`InputNormalization` as its first
  layer when the recipe asks for one (the data stay in [0, 1]).
* :func:`train_and_evaluate` -- one seed: build, train by :func:`spurfast.train.erm`, evaluate the
  training and test sets per group; accuracies in percent, and the wall seconds of every epoch.
* :func:`summarize_seeds` -- means over seeds and the check: every training group fit
  (>= ``fit_threshold`` %) while test worst-group accuracy lies >= ``min_worst_gap`` points below
  the test average.
* :func:`run_erm_study` -- every recipe x every seed on one train/test pair.
* :func:`markdown_table` -- the per-seed and mean rows of every recipe as one Markdown table.

Used by ``benchmarks/erm_textured_fashion.py``; this module computes and formats, it writes no files.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from spurfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from spurfast.metrics import evaluate
from spurfast.models import SmallCNN, efficientnet_lite0
from spurfast.train import erm

__all__ = [
    "ERM_MODELS", "NORMALIZATIONS", "ERMRecipe", "InputNormalization", "build_model", "train_and_evaluate",
    "summarize_seeds", "run_erm_study", "markdown_table",
]

#: Models a recipe can name.
ERM_MODELS = ("efficientnet_lite0", "small_cnn")
#: Input normalisations a recipe can name: per-channel ``(mean, std)``, or ``None`` for none.
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": None}
#: Per-seed entries averaged by :func:`summarize_seeds` (percent).
SCALAR_KEYS = ("train_avg_acc", "train_worst_group_acc", "test_avg_acc", "test_weighted_acc",
               "test_worst_group_acc", "test_avg_minus_worst")
#: Per-seed per-group lists averaged group by group (percent, points for the gap).
GROUP_KEYS = ("train_group_acc", "test_group_acc", "memorization_gap")


@dataclasses.dataclass
class ERMRecipe:
    """One configuration of the study.

    Args:
        model: one of :data:`ERM_MODELS`.
        epochs, lr, optimizer, lr_schedule, batch_size, momentum, weight_decay: passed to
            :func:`spurfast.train.erm` (``optimizer`` ``"adam"`` or ``"sgd"``; ``lr_schedule``
            ``"cosine"`` or ``"constant"``).
        pretrained: ``efficientnet_lite0`` only: start from the ImageNet weights.
        width: ``small_cnn`` only: channels of the first block.
        normalization: a key of :data:`NORMALIZATIONS`; ``"imagenet"`` puts a fixed
            :class:`InputNormalization` before the network (what ImageNet weights expect).
        channels_last: convert the model to ``torch.channels_last`` (faster on CPU for both models).
        num_classes: outputs of the classifier.

    Example:
        >>> ERMRecipe("small_cnn", epochs=2, lr=2e-3).to_dict()["normalization"]
        {'kind': 'none', 'mean': None, 'std': None, 'where': None}
    """

    model: str
    epochs: int
    lr: float
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    pretrained: bool = False
    width: int = 16
    normalization: str = "none"
    channels_last: bool = True
    num_classes: int = 2

    def __post_init__(self):
        if self.model not in ERM_MODELS:
            raise ValueError(f"model must be one of {ERM_MODELS}, got {self.model!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}, got {self.normalization!r}")
        if self.pretrained and self.model != "efficientnet_lite0":
            raise ValueError(f"pretrained=True needs model 'efficientnet_lite0', got {self.model!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain Python, the normalisation spelled out (mean, std, where it is applied)."""
        out = dataclasses.asdict(self)
        stats = NORMALIZATIONS[self.normalization]
        out["normalization"] = {
            "kind": self.normalization,
            "mean": None if stats is None else list(stats[0]),
            "std": None if stats is None else list(stats[1]),
            "where": None if stats is None else
            "first layer of the model, nn.Sequential(normalize=InputNormalization, net=model); the data stay in [0, 1]",
        }
        return out


class InputNormalization(nn.Module):
    """Fixed per-channel ``(x - mean) / std`` on ``[B, C, H, W]`` inputs (buffers, no parameters).

    It holds no Linear or Conv, so :class:`spurfast.NeuronStats` ignores it; the network's layers
    keep their names under ``net.`` when wrapped by :func:`build_model`.

    Example:
        >>> norm = InputNormalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> norm(torch.ones(1, 3, 2, 2))[0, :, 0, 0].tolist()
        [2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std must have the same positive length, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))  # [1, C, 1, 1]
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"x must be [B, {self.mean.shape[1]}, H, W], got {tuple(x.shape)}")
        return (x - self.mean) / self.std


def build_model(recipe: ERMRecipe) -> nn.Module:
    """The recipe's model (initialised from the global torch RNG), wrapped as
    ``nn.Sequential(normalize=InputNormalization, net=model)`` when ``recipe.normalization`` is set.

    Example:
        >>> model = build_model(ERMRecipe("small_cnn", epochs=1, lr=1e-3, width=4, normalization="imagenet"))
        >>> list(dict(model.named_children())), model(torch.rand(2, 3, 32, 32)).shape
        (['normalize', 'net'], torch.Size([2, 2]))
    """
    if recipe.model == "efficientnet_lite0":
        model = efficientnet_lite0(num_classes=recipe.num_classes, pretrained=recipe.pretrained)
    else:
        model = SmallCNN(num_classes=recipe.num_classes, width=recipe.width)
    stats = NORMALIZATIONS[recipe.normalization]
    if stats is not None:
        model = nn.Sequential(OrderedDict(normalize=InputNormalization(*stats), net=model))
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _pct(x: Optional[float]) -> Optional[float]:
    """A fraction as percent with 2 decimals; ``None`` for NaN (an empty group)."""
    return None if x is None or math.isnan(x) else round(100.0 * x, 2)


def _minus(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(a - b, 2)


def train_and_evaluate(
    recipe: ERMRecipe,
    train,
    test,
    seed: int,
    *,
    num_groups: int = 4,
    device: str = "cpu",
    progress: bool = False,
    eval_batch_size: int = 512,
) -> Dict[str, Any]:
    """Train one seed of ``recipe`` on ``train`` by ERM and evaluate ``train`` and ``test`` per group.

    ``seed`` seeds the model's initialisation (the new classifier of a pretrained model) and the
    data order. Evaluation runs once, after training, so the epoch times are training only.

    Returns a dict of plain Python: ``seed``; ``train_group_acc``, ``test_group_acc`` (percent per
    group, ``None`` for an empty group) and ``memorization_gap`` (train - test per group, points);
    ``train_avg_acc``, ``train_worst_group_acc``, ``test_avg_acc``, ``test_weighted_acc`` (test
    groups weighted by the training proportions), ``test_worst_group_acc``, ``test_worst_group``,
    ``test_avg_minus_worst``; ``final_train_loss``; ``build_seconds`` (model construction and
    weight loading), ``train_seconds`` (the :func:`~spurfast.train.erm` call), ``epoch_seconds``
    (one per epoch), ``seconds_per_epoch_per_100_images``, ``eval_seconds``; ``threads`` and
    ``torch``.
    """
    for name, dataset in (("train", train), ("test", test)):
        if not hasattr(dataset, "group_ids") or len(dataset) == 0:
            raise ValueError(f"{name} must be a non-empty dataset with .group_ids, got {type(dataset).__name__}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(recipe)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    history = erm(
        model, train, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=seed,
        optimizer=recipe.optimizer, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
        lr_schedule=recipe.lr_schedule, num_groups=num_groups, device=device, progress=progress,
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    train_group_counts = torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups)
    tr, te = (evaluate(model, ds, num_groups=num_groups, batch_size=eval_batch_size, device=device,
                       train_group_counts=train_group_counts) for ds in (train, test))
    eval_seconds = time.perf_counter() - started
    train_acc, test_acc = [_pct(a) for a in tr.group_acc.tolist()], [_pct(a) for a in te.group_acc.tolist()]
    epoch_seconds = [round(h["seconds"], 3) for h in history]
    return {
        "seed": seed,
        "train_group_acc": train_acc,
        "test_group_acc": test_acc,
        "memorization_gap": [_minus(a, b) for a, b in zip(train_acc, test_acc)],
        "train_avg_acc": _pct(tr.avg_acc),
        "train_worst_group_acc": _pct(tr.worst_group_acc),
        "test_avg_acc": _pct(te.avg_acc),
        "test_weighted_acc": _pct(te.weighted_acc),
        "test_worst_group_acc": _pct(te.worst_group_acc),
        "test_worst_group": te.worst_group,
        "test_avg_minus_worst": _minus(_pct(te.avg_acc), _pct(te.worst_group_acc)),
        "final_train_loss": history[-1]["loss"],
        "build_seconds": round(build_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "epoch_seconds": epoch_seconds,
        "seconds_per_epoch_per_100_images": round(100.0 * statistics.fmean(epoch_seconds) / len(train), 3),
        "eval_seconds": round(eval_seconds, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": round(statistics.fmean(present), 2), "std": round(statistics.pstdev(present), 2)}


def summarize_seeds(
    rows: Sequence[Mapping[str, Any]], *, fit_threshold: float = 99.0, min_worst_gap: float = 20.0
) -> Dict[str, Any]:
    """Means over seeds of the rows of :func:`train_and_evaluate`, and the study's check.

    Returns, for every key of :data:`SCALAR_KEYS`, ``{"mean", "std"}`` (population std over seeds);
    for every key of :data:`GROUP_KEYS`, the per-group means (a group absent from every seed gives
    ``None``); ``train_seconds`` (mean and std); ``all_train_groups_fit`` (every non-empty training
    group of every seed at >= ``fit_threshold`` %); ``worst_well_below_avg`` (every seed's test
    worst group >= ``min_worst_gap`` points below its test average); ``claim_met`` (both); the two
    thresholds; ``seeds``.

    Example:
        >>> rows = [{"train_group_acc": [100.0, 99.5], "test_group_acc": [98.0, 60.0],
        ...          "memorization_gap": [2.0, 39.5], "test_avg_acc": 79.0, "test_worst_group_acc": 60.0,
        ...          "seed": 0}]
        >>> s = summarize_seeds(rows)
        >>> s["test_group_acc"], s["test_avg_minus_worst"], s["claim_met"]
        ([98.0, 60.0], {'mean': 19.0, 'std': 0.0}, False)
    """
    if not rows:
        raise ValueError("rows must hold at least one seed's results")
    for key in ("train_group_acc", "test_group_acc", "test_avg_acc", "test_worst_group_acc"):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"rows[{missing[0]}] has no {key!r} (rows come from train_and_evaluate)")
    num_groups = len(rows[0]["train_group_acc"])
    if any(len(r[k]) != num_groups for r in rows for k in GROUP_KEYS if k in r):
        raise ValueError(f"every row's per-group lists must have {num_groups} entries")

    def worst_gap(r):
        return r.get("test_avg_minus_worst", _minus(r["test_avg_acc"], r["test_worst_group_acc"]))

    out: Dict[str, Any] = {"seeds": [r.get("seed") for r in rows]}
    for key in SCALAR_KEYS:
        values = [worst_gap(r) for r in rows] if key == "test_avg_minus_worst" else [r.get(key) for r in rows]
        out[key] = _mean_std(values)
    for key in GROUP_KEYS:
        out[key] = [_mean_std([r[key][g] for r in rows if key in r])["mean"] for g in range(num_groups)]
    out["test_group_acc_std"] = [_mean_std([r["test_group_acc"][g] for r in rows])["std"] for g in range(num_groups)]
    out["train_seconds"] = _mean_std([r.get("train_seconds") for r in rows])
    fit = all(a >= fit_threshold for r in rows for a in r["train_group_acc"] if a is not None)
    gaps = [worst_gap(r) for r in rows]
    below = all(g is not None and g >= min_worst_gap for g in gaps)
    out.update(all_train_groups_fit=fit, worst_well_below_avg=below, claim_met=fit and below,
               fit_threshold=fit_threshold, min_worst_gap=min_worst_gap)
    return out


def run_erm_study(
    recipes: Sequence[ERMRecipe],
    train,
    test,
    seeds: Sequence[int],
    *,
    num_groups: int = 4,
    device: str = "cpu",
    progress: bool = False,
    fit_threshold: float = 99.0,
    min_worst_gap: float = 20.0,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Every recipe with every seed: ``{recipe.model: {"recipe", "runs", "summary", "seconds"}}``.

    ``recipe`` is :meth:`ERMRecipe.to_dict`, ``runs`` one :func:`train_and_evaluate` row per
    seed, ``summary`` :func:`summarize_seeds` of them, ``seconds`` the wall time of the recipe's
    seeds. ``log`` receives one line per finished seed.
    """
    names = [r.model for r in recipes]
    if not recipes or len(set(names)) != len(names):
        raise ValueError(f"recipes must be non-empty with one recipe per model, got models {names}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    results: Dict[str, Dict[str, Any]] = {}
    for recipe in recipes:
        started = time.perf_counter()
        rows: List[Dict[str, Any]] = []
        for seed in seeds:
            row = train_and_evaluate(recipe, train, test, seed, num_groups=num_groups, device=device,
                                     progress=progress)
            rows.append(row)
            if log is not None:
                log(f"{recipe.model} seed {seed}: train {row['train_group_acc']} test {row['test_group_acc']} "
                    f"avg {row['test_avg_acc']} worst {row['test_worst_group_acc']} "
                    f"({row['train_seconds']} s training, {row['seconds_per_epoch_per_100_images']} s/epoch/100 images)")
        results[recipe.model] = {
            "recipe": recipe.to_dict(),
            "runs": rows,
            "summary": summarize_seeds(rows, fit_threshold=fit_threshold, min_worst_gap=min_worst_gap),
            "seconds": round(time.perf_counter() - started, 1),
        }
    return results


def _num(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _accs(values: Sequence[Optional[float]]) -> str:
    return " / ".join(_num(v) for v in values)


def markdown_table(results: Mapping[str, Mapping[str, Any]], group_names: Sequence[str]) -> str:
    """One Markdown table of :func:`run_erm_study`'s ``results``: a row per model and seed, a mean
    row per model (± std over seeds), then the group names and each model's check.

    Example:
        >>> row = {"seed": 0, "train_group_acc": [100.0, 100.0], "test_group_acc": [99.0, 41.0],
        ...        "memorization_gap": [1.0, 59.0], "test_avg_acc": 70.0, "test_worst_group_acc": 41.0,
        ...        "train_seconds": 3.0, "epoch_seconds": [1.5, 1.5]}
        >>> results = {"small_cnn": {"runs": [row], "summary": summarize_seeds([row])}}
        >>> print(markdown_table(results, ["a", "b"]).splitlines()[2])
        | small_cnn | 0 | 100.0 / 100.0 | 99.0 / 41.0 | 1.0 / 59.0 | 70.0 | 41.0 | 3 (1.5) |
    """
    if not results:
        raise ValueError("results must hold at least one model")
    groups = "/".join(f"g{g}" for g in range(len(group_names)))
    header = (f"| model | seed | train acc {groups} (%) | test acc {groups} (%) | gap train - test {groups} (points) "
              "| test avg | test worst | train s (s/epoch) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    checks = []
    for name, entry in results.items():
        for r in entry["runs"]:
            epochs = r.get("epoch_seconds") or []
            per_epoch = f" ({_num(statistics.fmean(epochs))})" if epochs else ""
            lines.append(
                f"| {name} | {r['seed']} | {_accs(r['train_group_acc'])} | {_accs(r['test_group_acc'])} | "
                f"{_accs(r['memorization_gap'])} | {_num(r['test_avg_acc'])} | {_num(r['test_worst_group_acc'])} | "
                f"{_num(r.get('train_seconds'), 0)}{per_epoch} |"
            )
        s = entry["summary"]
        if len(entry["runs"]) > 1:
            lines.append(
                f"| {name} | **mean** | {_accs(s['train_group_acc'])} | {_accs(s['test_group_acc'])} | "
                f"{_accs(s['memorization_gap'])} | {_num(s['test_avg_acc']['mean'])} ± {_num(s['test_avg_acc']['std'])} | "
                f"{_num(s['test_worst_group_acc']['mean'])} ± {_num(s['test_worst_group_acc']['std'])} | "
                f"{_num(s['train_seconds']['mean'], 0)} |"
            )
        checks.append(
            f"{name}: every training group >= {_num(s['fit_threshold'], 0)} %: "
            f"{'yes' if s['all_train_groups_fit'] else 'no'}; test worst >= {_num(s['min_worst_gap'], 0)} points "
            f"below test avg: {'yes' if s['worst_well_below_avg'] else 'no'}"
        )
    lines.append("")
    lines.append("Groups: " + ", ".join(f"g{g} = {n}" for g, n in enumerate(group_names)) + ".")
    lines.append("")
    lines.extend(f"- {c}" for c in checks)
    return "\n".join(lines)
