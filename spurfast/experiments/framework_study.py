"""ERM vs the dense/masked framework (You et al. 2025, Part II), with DFR as a reference point.

Per seed, one ERM model (an :class:`~spurfast.experiments.erm_study.ERMRecipe`), then from
copies of it:

* ``framework_<on>`` -- :func:`spurfast.train.silent_majority` fine-tuning with the paper's
  defaults (Adam 2e-4, ReduceLROnPlateau on the training objective, 21 epochs, batch 100, 1 %
  smallest weights masked), one per contrast space ``on`` (``"features"``: the paper's text,
  ``"softmax"``: its public code, ``"logits"``);
* ``erm_continued`` -- the control: as many more epochs of plain ERM with the same optimizer,
  rate and batch (constant rate), so that a gain is not just more training;
* ``dfr`` -- :func:`spurfast.train.dfr.dfr`: the ERM model's last layer refit on the
  group-balanced validation split (which uses the validation set's group labels; the others
  do not).

Every method's model is evaluated on the training and the test set: per-group accuracies, the
memorization gap (train - test per group) and its mean over the minority groups
(:func:`minority_groups`), the test average and worst-group accuracy. Nothing is tuned on the
test set: every setting is fixed before the run.

* :class:`FrameworkStudyConfig`, :func:`run_seed`, :func:`compare_methods` (the methods after
  ERM, from a model trained elsewhere, as ``spurfast demo`` does), :func:`run_framework_study`,
  :func:`summarize_method`, :func:`markdown_table`, and :func:`estimate_seconds` (one epoch of
  every piece, timed, extrapolated to the whole study).

Used by ``benchmarks/silent_majority.py``; this module computes and formats, it writes no files.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from spurfast.experiments.erm_study import ERMRecipe, build_model
from spurfast.losses import CONTRAST_ON
from spurfast.metrics import evaluate
from spurfast.train.dfr import dfr
from spurfast.train.erm import erm
from spurfast.train.silent_majority import silent_majority

__all__ = [
    "FrameworkStudyConfig", "minority_groups", "evaluate_method", "run_seed", "compare_methods", "run_framework_study",
    "summarize_method", "markdown_table", "estimate_seconds", "method_names",
]

#: Per-seed scalars averaged by :func:`summarize_method` (percent; points for the gap).
SCALAR_KEYS = ("test_avg_acc", "test_weighted_acc", "test_worst_group_acc", "train_avg_acc", "minority_gap")
GROUP_KEYS = ("train_group_acc", "test_group_acc", "memorization_gap")


@dataclasses.dataclass
class FrameworkStudyConfig:
    """Settings of the study.

    Args:
        recipe: the ERM stage (model and its training settings).
        seeds: training seeds (ERM init and data order; the later stages reuse the seed).
        epochs, lr, batch_size: the framework's fine-tuning and the ERM-continued control
            (the paper's 21, 2e-4, 100).
        variants: contrast spaces of the framework, each a method ``framework_<on>``.
        prune_fraction: weights masked per epoch (the paper's 0.01).
        plateau_metric: what ReduceLROnPlateau follows (see :func:`~spurfast.train.silent_majority`).
        control: run ``erm_continued``. dfr: run ``dfr``.
        dfr_C, dfr_subsamples: DFR's fixed setting (see :mod:`spurfast.train.dfr`).

    Example:
        >>> cfg = FrameworkStudyConfig(ERMRecipe("small_cnn", epochs=2, lr=2e-3))
        >>> method_names(cfg)
        ['erm', 'erm_continued', 'framework_features', 'framework_softmax', 'dfr']
    """

    recipe: ERMRecipe
    seeds: Tuple[int, ...] = (0, 1, 2)
    epochs: int = 21
    lr: float = 2e-4
    batch_size: int = 100
    variants: Tuple[str, ...] = ("features", "softmax")
    prune_fraction: float = 0.01
    plateau_metric: str = "loss"
    control: bool = True
    dfr: bool = True
    dfr_C: float = 1.0
    dfr_subsamples: int = 10

    def __post_init__(self):
        self.seeds, self.variants = tuple(self.seeds), tuple(self.variants)
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        bad = [v for v in self.variants if v not in CONTRAST_ON]
        if bad or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct values of {CONTRAST_ON}, got {self.variants}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recipe"] = self.recipe.to_dict()
        return out


def method_names(cfg: FrameworkStudyConfig) -> List[str]:
    """The methods the study runs, in order."""
    return (["erm"] + (["erm_continued"] if cfg.control else []) + [f"framework_{v}" for v in cfg.variants]
            + (["dfr"] if cfg.dfr else []))


def minority_groups(train_group_counts: Sequence[int]) -> List[int]:
    """Groups with fewer training samples than half a uniform share (``n / (2 G)``).

    Example:
        >>> minority_groups([1459, 77, 23, 441])   # Waterbirds' proportions: groups 1 and 2
        [1, 2]
    """
    counts = [int(c) for c in train_group_counts]
    if not counts or sum(counts) <= 0:
        raise ValueError(f"train_group_counts must be non-empty with a positive sum, got {counts}")
    share = sum(counts) / (2 * len(counts))
    return [g for g, c in enumerate(counts) if c < share]


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(100.0 * x, 2)


def evaluate_method(model: nn.Module, train, test, *, num_groups: int = 4, device: str = "cpu",
                    minority: Optional[Sequence[int]] = None, eval_batch_size: int = 512) -> Dict[str, Any]:
    """Per-group train/test accuracies (percent), the memorization gap (points) and its mean over
    ``minority`` (``minority_gap``), test average / weighted / worst-group accuracy."""
    train_counts = torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups)
    if minority is None:
        minority = minority_groups(train_counts.tolist())
    tr, te = (evaluate(model, ds, num_groups=num_groups, batch_size=eval_batch_size, device=device,
                       train_group_counts=train_counts) for ds in (train, test))
    train_acc = [_pct(a) for a in tr.group_acc.tolist()]
    test_acc = [_pct(a) for a in te.group_acc.tolist()]
    gap = [None if a is None or b is None else round(a - b, 2) for a, b in zip(train_acc, test_acc)]
    minority_gaps = [gap[g] for g in minority if gap[g] is not None]
    return {
        "train_group_acc": train_acc,
        "test_group_acc": test_acc,
        "memorization_gap": gap,
        "minority_gap": round(statistics.fmean(minority_gaps), 2) if minority_gaps else None,
        "train_avg_acc": _pct(tr.avg_acc),
        "test_avg_acc": _pct(te.avg_acc),
        "test_weighted_acc": _pct(te.weighted_acc),
        "test_worst_group_acc": _pct(te.worst_group_acc),
        "test_worst_group": te.worst_group,
    }


def _check_sets(train, val, test) -> None:
    for name, dataset in (("train", train), ("val", val), ("test", test)):
        if not hasattr(dataset, "group_ids") or len(dataset) == 0:
            raise ValueError(f"{name} must be a non-empty dataset with .group_ids, got {type(dataset).__name__}")


def _erm_stage(cfg: FrameworkStudyConfig, model: nn.Module, train, seed: int, *, epochs: int, num_groups: int,
               device: str, progress: bool) -> List[Dict[str, Any]]:
    recipe = cfg.recipe
    return erm(model, train, epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=seed,
               optimizer=recipe.optimizer, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
               lr_schedule=recipe.lr_schedule, num_groups=num_groups, device=device, progress=progress)


def _methods(cfg: FrameworkStudyConfig, erm_model: nn.Module, train, val, seed: int, *, epochs: int,
             num_groups: int, device: str, progress: bool):
    """Yield ``(name, model, history or None)`` for every method after ERM, each from a copy."""
    if cfg.control:
        model = copy.deepcopy(erm_model)
        history = erm(model, train, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                      optimizer="adam", lr_schedule="constant", num_groups=num_groups, device=device,
                      progress=progress)
        yield "erm_continued", model, history
    for on in cfg.variants:
        model = copy.deepcopy(erm_model)
        history = silent_majority(model, train, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                                  on=on, prune_fraction=cfg.prune_fraction, plateau_metric=cfg.plateau_metric,
                                  num_groups=num_groups, device=device, progress=progress)
        yield f"framework_{on}", model, history
    if cfg.dfr:
        yield "dfr", dfr(erm_model, val, C=cfg.dfr_C, n_subsamples=cfg.dfr_subsamples, seed=seed, device=device), None


def run_seed(cfg: FrameworkStudyConfig, train, val, test, seed: int, *, num_groups: int = 4, device: str = "cpu",
             progress: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """One seed: ERM, then every other method from a copy of the ERM model.

    Returns ``{method: row}`` with :func:`evaluate_method`'s keys plus ``seed``, ``seconds``
    (the method's training or fitting wall time, evaluation excluded), ``epoch_seconds``
    (per epoch, for trained methods) and, for the framework, ``final_lr`` and ``mask_fraction``.
    """
    _check_sets(train, val, test)
    torch.manual_seed(seed)
    model = build_model(cfg.recipe)
    started = time.perf_counter()
    history = _erm_stage(cfg, model, train, seed, epochs=cfg.recipe.epochs, num_groups=num_groups, device=device,
                         progress=progress)
    return compare_methods(cfg, model, train, val, test, seed, erm_history=history,
                           erm_seconds=time.perf_counter() - started, num_groups=num_groups, device=device,
                           progress=progress, log=log)


def compare_methods(cfg: FrameworkStudyConfig, erm_model: nn.Module, train, val, test, seed: int, *,
                    erm_history: Optional[Sequence[Mapping[str, Any]]] = None, erm_seconds: Optional[float] = None,
                    num_groups: int = 4, device: str = "cpu", progress: bool = False,
                    log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Every method of ``cfg`` after ERM, from copies of an already trained ``erm_model`` (left
    unchanged); rows as :func:`run_seed` returns them, ``erm`` first (``seconds`` is
    ``erm_seconds``, ``None`` when not given). ``cfg.recipe`` is only recorded, not used.
    """
    _check_sets(train, val, test)
    minority = minority_groups(torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups).tolist())
    rows: Dict[str, Dict[str, Any]] = {}

    def record(name, trained, history, seconds):
        row = {"seed": seed, **evaluate_method(trained, train, test, num_groups=num_groups, device=device,
                                               minority=minority)}
        row["seconds"] = None if seconds is None else round(seconds, 2)
        if history:
            row["epoch_seconds"] = [round(h["seconds"], 3) for h in history]
            if "mask_fraction" in history[-1]:
                row["final_lr"], row["mask_fraction"] = history[-1]["lr"], history[-1]["mask_fraction"]
        rows[name] = row
        if log is not None:
            log(f"seed {seed} {name}: test {row['test_group_acc']} avg {row['test_avg_acc']} worst "
                f"{row['test_worst_group_acc']}, minority gap {row['minority_gap']} ({row['seconds']} s)")

    record("erm", erm_model, erm_history, erm_seconds)
    started = time.perf_counter()
    for name, trained, history in _methods(cfg, erm_model, train, val, seed, epochs=cfg.epochs, num_groups=num_groups,
                                           device=device, progress=progress):
        record(name, trained, history, time.perf_counter() - started)
        started = time.perf_counter()
    return rows


def _mean_std(values) -> Dict[str, Optional[float]]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": round(statistics.fmean(present), 2), "std": round(statistics.pstdev(present), 2)}


def summarize_method(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Means and population std over seeds of :data:`SCALAR_KEYS`, per-group means of
    :data:`GROUP_KEYS`, and ``seconds``.

    Example:
        >>> rows = [{"test_avg_acc": 80.0, "test_worst_group_acc": 40.0, "minority_gap": 50.0,
        ...          "train_group_acc": [100.0, 100.0], "test_group_acc": [90.0, 40.0],
        ...          "memorization_gap": [10.0, 60.0], "seconds": 2.0},
        ...         {"test_avg_acc": 84.0, "test_worst_group_acc": 50.0, "minority_gap": 40.0,
        ...          "train_group_acc": [100.0, 100.0], "test_group_acc": [90.0, 50.0],
        ...          "memorization_gap": [10.0, 50.0], "seconds": 4.0}]
        >>> s = summarize_method(rows)
        >>> s["test_worst_group_acc"], s["test_group_acc"]
        ({'mean': 45.0, 'std': 5.0}, [90.0, 45.0])
    """
    if not rows:
        raise ValueError("rows must hold at least one seed")
    num_groups = len(rows[0]["test_group_acc"])
    out: Dict[str, Any] = {"seeds": [r.get("seed") for r in rows]}
    for key in SCALAR_KEYS:
        out[key] = _mean_std([r.get(key) for r in rows])
    for key in GROUP_KEYS:
        out[key] = [_mean_std([r[key][g] for r in rows if key in r])["mean"] for g in range(num_groups)]
    out["seconds"] = _mean_std([r.get("seconds") for r in rows])
    return out


def run_framework_study(cfg: FrameworkStudyConfig, train, val, test, *, num_groups: int = 4, device: str = "cpu",
                        progress: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Every seed of :func:`run_seed`: ``{"methods": {name: {"runs": [row per seed], "summary"}},
    "minority_groups", "seconds"}``."""
    _check_sets(train, val, test)
    started = time.perf_counter()
    per_seed = [run_seed(cfg, train, val, test, seed, num_groups=num_groups, device=device, progress=progress,
                         log=log) for seed in cfg.seeds]
    methods = {}
    for name in method_names(cfg):
        runs = [rows[name] for rows in per_seed]
        methods[name] = {"runs": runs, "summary": summarize_method(runs)}
    counts = torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups).tolist()
    return {"methods": methods, "minority_groups": minority_groups(counts),
            "seconds": round(time.perf_counter() - started, 1)}


def _num(x, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _accs(values) -> str:
    return " / ".join(_num(v) for v in values)


def markdown_table(methods: Mapping[str, Mapping[str, Any]], group_names: Sequence[str],
                   minority: Sequence[int]) -> str:
    """A mean-over-seeds table (one row per method, ± population std) and a per-seed table.

    Example:
        >>> row = {"seed": 0, "train_group_acc": [100.0, 100.0], "test_group_acc": [99.0, 41.0],
        ...        "memorization_gap": [1.0, 59.0], "minority_gap": 59.0, "test_avg_acc": 70.0,
        ...        "test_worst_group_acc": 41.0, "seconds": 3.0}
        >>> table = markdown_table({"erm": {"runs": [row], "summary": summarize_method([row])}}, ["a", "b"], [1])
        >>> print(table.splitlines()[2])
        | erm | 70.0 ± 0.0 | 41.0 ± 0.0 | 99.0 / 41.0 | 100.0 / 100.0 | 59.0 ± 0.0 | 3 |
    """
    if not methods:
        raise ValueError("methods must hold at least one method")
    groups = "/".join(f"g{g}" for g in range(len(group_names)))
    lines = [
        f"| method | test avg | test worst | test acc {groups} | train acc {groups} | minority gap (points) "
        "| s per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in methods.items():
        s = entry["summary"]
        lines.append(
            f"| {name} | {_num(s['test_avg_acc']['mean'])} ± {_num(s['test_avg_acc']['std'])} | "
            f"{_num(s['test_worst_group_acc']['mean'])} ± {_num(s['test_worst_group_acc']['std'])} | "
            f"{_accs(s['test_group_acc'])} | {_accs(s['train_group_acc'])} | "
            f"{_num(s['minority_gap']['mean'])} ± {_num(s['minority_gap']['std'])} | {_num(s['seconds']['mean'], 0)} |"
        )
    lines += ["", f"| method | seed | test avg | test worst | test acc {groups} | gap {groups} |",
              "|---|---|---|---|---|---|"]
    for name, entry in methods.items():
        for r in entry["runs"]:
            lines.append(f"| {name} | {r['seed']} | {_num(r['test_avg_acc'])} | {_num(r['test_worst_group_acc'])} | "
                         f"{_accs(r['test_group_acc'])} | {_accs(r['memorization_gap'])} |")
    lines += ["", "Groups: " + ", ".join(f"g{g} = {n}" for g, n in enumerate(group_names))
              + f"; minority groups (the gap's mean): {', '.join(f'g{g}' for g in minority)}."]
    return "\n".join(lines)


def estimate_seconds(cfg: FrameworkStudyConfig, train, val, test, *, num_groups: int = 4, device: str = "cpu",
                     seed: int = 0) -> Dict[str, Any]:
    """Time one epoch of every piece on these data and extrapolate to the whole study.

    Runs, on a fresh model of ``cfg.recipe``: one ERM epoch, one epoch of the control and of each
    framework variant, one DFR fit and one evaluation of train + test; then ``expected`` = seeds x
    (ERM epochs x ERM epoch + epochs x (control + variants) epoch + DFR + evaluations). The
    cosine ERM schedule is timed over one epoch as if the run had one epoch (same cost per step).
    """
    _check_sets(train, val, test)
    one = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, epochs=1), epochs=1, seeds=(seed,))
    torch.manual_seed(seed)
    model = build_model(one.recipe)
    started = time.perf_counter()
    _erm_stage(one, model, train, seed, epochs=1, num_groups=num_groups, device=device, progress=False)
    pieces = {"erm_epoch": time.perf_counter() - started}
    started = time.perf_counter()
    evaluate_method(model, train, test, num_groups=num_groups, device=device)
    pieces["evaluation"] = time.perf_counter() - started
    started = time.perf_counter()
    for name, _, _ in _methods(one, model, train, val, seed, epochs=1, num_groups=num_groups, device=device,
                               progress=False):
        pieces[name if name == "dfr" else f"{name}_epoch"] = time.perf_counter() - started
        started = time.perf_counter()
    per_seed = pieces["erm_epoch"] * cfg.recipe.epochs + pieces.get("dfr", 0.0)
    per_seed += sum(v * cfg.epochs for k, v in pieces.items() if k.endswith("_epoch") and k != "erm_epoch")
    per_seed += pieces["evaluation"] * len(method_names(cfg))
    return {"pieces_seconds": {k: round(v, 2) for k, v in pieces.items()},
            "expected_seconds_per_seed": round(per_seed, 1),
            "expected_full_run_seconds": round(per_seed * len(cfg.seeds), 1),
            "threads": torch.get_num_threads(), "n_train": len(train)}
