"""Example-tied dropout (Maini et al. 2023) as ground truth for localization, against plain ERM.

For each training seed, with the same model, data order and settings:

1. **ERM**: train, then per-group train and test accuracy and the memorization gap (train - test).
2. **Example-tied dropout** on ``cfg.layers`` (:class:`~spurfast.train.example_tied.ExampleTiedDropout`):
   train with each training example's own channels on (the example index rides in an extra
   input channel, so :func:`~spurfast.train.erm` trains unchanged), then per-group train accuracy
   *with* the examples' channels on ("tied", eval mode), train accuracy with the memorization
   channels dropped, and test accuracy with them dropped (test time). The gap is tied train
   minus dropped test. A training example is *memorized* when it is right with its channels on
   and wrong with them dropped.
3. **Localization against the known channels**, on the training split with every example's
   channels on: for each minority group g and score (:data:`SCORES`), over the channels of the
   layers whose units carry the dropout (``features.bn3`` -> units of ``features.conv3``): the
   AUROC of the score for "memorization channel tied to at least one example of g" (against
   every other channel, and against the generalist channels only), the fraction of the top-k
   that are such channels (and its base rate), and the Spearman correlation of the score with
   the number of g's examples tied to each memorization channel.
4. **Per memorized example** (the first ``cfg.per_example`` of each minority group, by index):
   the example's own first-order ablation harm (weight x gradient, Maini et al.'s score) and
   its gradient norm, each ranked over the same channels: AUROC of "tied to this example"
   against the generalist channels, and precision of the top-|tied|. (Memorization channels
   not tied to the example are off for it, so its scores there are exactly 0: they are left
   out of the AUROC rather than counted as easy negatives.)

Used by ``benchmarks/example_tied.py``; computes and formats (Markdown) only.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from spurfast.attribution import (
    ablation_scores,
    auroc,
    fast_score,
    group_gradient,
    magnitude,
    verified_localize,
)
from spurfast.attribution.scores import NeuronScores, as_tensors, tracked_layers
from spurfast.data.specs import TensorGroupDataset
from spurfast.experiments.memorization import group_roles, spearman
from spurfast.metrics import evaluate
from spurfast.train import erm
from spurfast.train.example_tied import ExampleTiedDropout

#: Scores checked against the known channels, in table order.
SCORES = ("magnitude", "group_gradient", "ablation_margin_harm", "ablation_margin_flip_rate", "verified")
#: Per-example scores: the example's first-order ablation harm (weight x gradient) and gradient norm.
EXAMPLE_SCORES = ("ablation_margin_harm", "gradient_norm")


def default_unit_layer(layer: str) -> str:
    """The layer whose units a dropout layer's channels belong to: ``features.bn3`` -> ``features.conv3``."""
    head, _, leaf = layer.rpartition(".")
    if leaf.startswith("bn"):
        leaf = "conv" + leaf[2:]
    return f"{head}.{leaf}" if head else leaf


@dataclasses.dataclass
class ExampleTiedConfig:
    """Settings of the example-tied dropout benchmark (the training ones are the ERM study's)."""

    seeds: Sequence[int] = (0,)
    epochs: int = 30
    lr: float = 2e-3
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    batch_size: int = 64
    layers: Sequence[str] = ("features.bn3", "features.bn4")
    unit_layers: Optional[Mapping[str, str]] = None  # dropout layer -> scored layer; default default_unit_layer
    generalist: float = 0.2
    p: float = 0.1
    dropout_seed: int = 0
    hardest: int = 200
    top_k: Sequence[int] = (5, 10)
    candidates: int = 32
    per_example: int = 10
    scores: Sequence[str] = SCORES
    minority: Optional[Sequence[int]] = None
    eval_batch_size: int = 1024
    device: str = "cpu"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "hardest", "candidates", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.per_example, bool) or not isinstance(self.per_example, int) or self.per_example < 0:
            raise ValueError(f"per_example must be an int >= 0, got {self.per_example!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.layers or isinstance(self.layers, str):
            raise ValueError("layers must be a non-empty sequence of module names")
        unknown = [s for s in self.scores if s not in SCORES]
        if unknown:
            raise ValueError(f"scores: unknown {unknown}; choose from {SCORES}")
        if not self.top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.top_k):
            raise ValueError(f"top_k must be positive ints, got {list(self.top_k)!r}")
        self.seeds, self.top_k = [int(s) for s in self.seeds], sorted(set(self.top_k))
        self.layers, self.scores = list(self.layers), list(self.scores)
        if self.unit_layers is None:
            self.unit_layers = {n: default_unit_layer(n) for n in self.layers}
        missing = [n for n in self.layers if n not in self.unit_layers]
        if missing:
            raise ValueError(f"unit_layers must map every dropout layer; missing {missing}")
        self.unit_layers = {n: self.unit_layers[n] for n in self.layers}

    def to_dict(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _pct(x: float) -> Optional[float]:
    return None if x is None or x != x else round(100 * x, 2)


def _accs(result) -> List[Optional[float]]:
    return [_pct(a) for a in result.group_acc.tolist()]


def _minus(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> List[Optional[float]]:
    return [None if x is None or y is None else round(x - y, 2) for x, y in zip(a, b)]


def _safe_auroc(values: torch.Tensor, positive: torch.Tensor) -> Optional[float]:
    if not bool(positive.any()) or bool(positive.all()):
        return None
    return round(auroc(values, positive), 4)


def _train(make_model, train, cfg: ExampleTiedConfig, seed: int, num_groups: int, etd_factory=None):
    """One ERM run; with ``etd_factory``, under example-tied dropout. Returns (model, etd, seconds)."""
    torch.manual_seed(seed)
    model = make_model().to(cfg.device)
    kwargs = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, optimizer=cfg.optimizer,
                  lr_schedule=cfg.lr_schedule, num_groups=num_groups, device=cfg.device, progress=False)
    started = time.perf_counter()
    if etd_factory is None:
        history = erm(model, train, **kwargs)
        return model, None, time.perf_counter() - started, history
    etd = etd_factory(model)
    indexed = TensorGroupDataset(etd.with_index_channel(train.images), train.labels, train.group_ids, num_groups)
    with etd.indexed_inputs():
        history = erm(model, indexed, **kwargs)
    return model, etd, time.perf_counter() - started, history


class _Truth:
    """The known channels, flattened over the scored layers in ``cfg.layers`` order."""

    def __init__(self, etd: ExampleTiedDropout, cfg: ExampleTiedConfig, group_ids: torch.Tensor, minority: Sequence[int]):
        self.etd = etd
        self.units = [(cfg.unit_layers[n], c) for n in cfg.layers for c in range(etd.channels[n])]
        self.generalist = torch.tensor(
            [c < etd.num_generalist[n] for n in cfg.layers for c in range(etd.channels[n])])  # [M] bool
        self.ties: Dict[int, torch.Tensor] = {}  # group -> [M] examples of the group tied to each channel
        for g in minority:
            counts = etd.tie_counts((group_ids == g).nonzero().flatten())
            self.ties[g] = torch.cat([counts[n] for n in cfg.layers])
        self.cfg = cfg

    def values(self, scores: NeuronScores) -> torch.Tensor:
        """``[M]`` float64: the score of every scored channel."""
        by_layer = {}
        for dropout_layer, unit_layer in self.cfg.unit_layers.items():
            if unit_layer not in scores:
                raise ValueError(f"{scores.kind} has no layer {unit_layer!r}; it scores {scores.layer_names}")
            by_layer[dropout_layer] = scores[unit_layer].double().cpu()
        return torch.cat([by_layer[n] for n in self.cfg.layers])

    def group_metrics(self, values: torch.Tensor, group: int) -> Dict[str, object]:
        tied = self.ties[group] > 0  # [M]
        memorization = ~self.generalist
        order = torch.sort(values, descending=True, stable=True).indices
        out: Dict[str, object] = {
            "auroc_tied_vs_rest": _safe_auroc(values, tied),
            "auroc_tied_vs_generalist": _safe_auroc(values[tied | self.generalist], tied[tied | self.generalist]),
            "base_rate_tied": round(float(tied.double().mean()), 4),
        }
        for k in self.cfg.top_k:
            out[f"top{k}_tied"] = round(float(tied[order[:k]].double().mean()), 4)
        mem_values, mem_ties = values[memorization], self.ties[group][memorization]
        rho = spearman(mem_values.tolist(), mem_ties.double().tolist()) if mem_values.numel() > 1 else float("nan")
        out["spearman_with_ties"] = None if rho != rho else round(rho, 4)
        out["top_units"] = [f"{self.units[int(i)][0]}:{self.units[int(i)][1]}" for i in order[:3]]
        return out

    def ranked_metrics(self, ranking: Sequence, group: int) -> Dict[str, object]:
        """Top-k metrics of a ranking of units (a verified selection): no score values to rank by."""
        index = {u: i for i, u in enumerate(self.units)}
        tied = self.ties[group] > 0
        picks = [index[(u.layer, u.channel)] for u in ranking if (u.layer, u.channel) in index]
        out: Dict[str, object] = {"base_rate_tied": round(float(tied.double().mean()), 4)}
        for k in self.cfg.top_k:
            out[f"top{k}_tied"] = round(float(tied[picks[:k]].double().mean()), 4) if picks[:k] else None
        out["top_units"] = [f"{self.units[i][0]}:{self.units[i][1]}" for i in picks[:3]]
        return out


def localization_report(model, etd: ExampleTiedDropout, indexed_train, cfg: ExampleTiedConfig, roles, num_groups: int,
                        log: Callable[[str], None] = lambda s: None):
    """Score every channel on the training split (each example's channels on) and check against the truth."""
    majority, minority = roles
    x, y, g = indexed_train
    truth = _Truth(etd, cfg, g, minority)
    scored = sorted(set(cfg.unit_layers.values()))
    exclude = [n for n in tracked_layers(model) if n not in scored]  # rank only the layers with ground truth
    out: Dict[str, Dict[str, object]] = {s: {} for s in cfg.scores}
    seconds: Dict[str, float] = {}
    wanted = set(cfg.scores)
    with etd.indexed_inputs():
        started = time.perf_counter()
        if "magnitude" in wanted:
            values = truth.values(magnitude(model))
            out["magnitude"] = {str(t): truth.group_metrics(values, t) for t in minority}
        seconds["magnitude"] = time.perf_counter() - started
        if "group_gradient" in wanted:
            started = time.perf_counter()
            gg = group_gradient(model, indexed_train, num_groups, hardest=cfg.hardest)
            out["group_gradient"] = {str(t): truth.group_metrics(truth.values(gg.for_group(t)), t) for t in minority}
            seconds["group_gradient"] = time.perf_counter() - started
        if "ablation_margin_harm" in wanted:
            started = time.perf_counter()
            harm = ablation_scores(model, indexed_train, num_groups, "margin").harm
            out["ablation_margin_harm"] = {str(t): truth.group_metrics(truth.values(harm.for_group(t)), t) for t in minority}
            seconds["ablation_margin_harm"] = time.perf_counter() - started
        fast: Dict[int, NeuronScores] = {}
        if wanted & {"ablation_margin_flip_rate", "verified"}:
            started = time.perf_counter()
            fast = {t: fast_score(model, indexed_train, num_groups, t, majority) for t in minority}
            if "ablation_margin_flip_rate" in wanted:
                out["ablation_margin_flip_rate"] = {str(t): truth.group_metrics(truth.values(fast[t]), t) for t in minority}
            seconds["ablation_margin_flip_rate"] = time.perf_counter() - started
        if "verified" in wanted:
            started = time.perf_counter()
            for t in minority:
                found = verified_localize(model, indexed_train, num_groups, t, k=max(cfg.top_k), scores=fast[t],
                                          candidates=max(cfg.candidates, max(cfg.top_k)), majority=majority,
                                          exclude=exclude)
                entry = truth.ranked_metrics(found.units, t)
                entry["utility_top3"] = [round(float(u), 2) for u in torch.sort(found.utility, descending=True).values[:3]]
                out["verified"][str(t)] = entry
            seconds["verified"] = time.perf_counter() - started
    log("scores: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return out, {k: round(v, 2) for k, v in seconds.items()}, truth


def per_example_report(model, etd: ExampleTiedDropout, indexed_train, memorized: torch.Tensor, truth: _Truth,
                       cfg: ExampleTiedConfig, minority: Sequence[int], num_groups: int) -> Dict[str, object]:
    """Each memorized minority example's own scores against the channels tied to it."""
    x, y, g = indexed_train
    out: Dict[str, object] = {}
    with etd.indexed_inputs():
        for t in minority:
            chosen = [int(i) for i in ((g == t) & memorized).nonzero().flatten()[: cfg.per_example]]
            rows = []
            for i in chosen:
                one = (x[i:i + 1], y[i:i + 1], g[i:i + 1])
                tied_layers = etd.channels_of(i)
                tied = torch.tensor([c in tied_layers[n] for n in cfg.layers for c in range(etd.channels[n])])  # [M]
                row: Dict[str, object] = {"example": i, "tied_channels": int(tied.sum())}
                values = {
                    "ablation_margin_harm": truth.values(ablation_scores(model, one, num_groups, "margin").harm.for_group(t)),
                    "gradient_norm": truth.values(group_gradient(model, one, num_groups, hardest=1).for_group(t)),
                }
                pool = tied | truth.generalist
                for name, v in values.items():
                    k = int(tied.sum())
                    order = torch.sort(v, descending=True, stable=True).indices
                    row[name] = {
                        "auroc_tied_vs_generalist": _safe_auroc(v[pool], tied[pool]),
                        "precision_at_tied": round(float(tied[order[:k]].double().mean()), 4) if k else None,
                        "top1_tied": bool(tied[order[0]]) if v.numel() else None,
                    }
                rows.append(row)
            summary = {}
            for name in EXAMPLE_SCORES:
                au = [r[name]["auroc_tied_vs_generalist"] for r in rows if r[name]["auroc_tied_vs_generalist"] is not None]
                pr = [r[name]["precision_at_tied"] for r in rows if r[name]["precision_at_tied"] is not None]
                summary[name] = {
                    "auroc_mean": round(statistics.fmean(au), 4) if au else None,
                    "precision_at_tied_mean": round(statistics.fmean(pr), 4) if pr else None,
                    "top1_tied": sum(bool(r[name]["top1_tied"]) for r in rows),
                }
            base = [r["tied_channels"] / len(truth.units) for r in rows]
            chance = round(statistics.fmean(base), 4) if base else None
            out[str(t)] = {"examples": rows, "summary": summary, "chance_precision": chance}
    return out


def analyze_seed(make_model, train, test, cfg: ExampleTiedConfig, roles, num_groups: int, seed: int,
                 log: Callable[[str], None] = lambda s: None) -> Dict[str, object]:
    """ERM and example-tied dropout for one seed, and the localization checks; JSON-ready."""
    majority, minority = roles
    record: Dict[str, object] = {"seed": seed, "seconds": {}}
    counts = torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups)

    def acc(model, data):
        return _accs(evaluate(model, data, num_groups=num_groups, batch_size=cfg.eval_batch_size, device=cfg.device,
                              train_group_counts=counts))

    erm_model, _, seconds, history = _train(make_model, train, cfg, seed, num_groups)
    record["seconds"]["erm_train"] = round(seconds, 1)
    record["epoch_seconds_erm"] = round(statistics.fmean(h["seconds"] for h in history), 2)
    erm_train, erm_test = acc(erm_model, train), acc(erm_model, test)
    record["erm"] = {"train_group_acc": erm_train, "test_group_acc": erm_test, "gap": _minus(erm_train, erm_test)}
    log(f"ERM: train {erm_train}, test {erm_test} ({seconds:.0f} s)")

    def factory(model):
        return ExampleTiedDropout(model, cfg.layers, generalist=cfg.generalist, p=cfg.p, seed=cfg.dropout_seed + seed)

    model, etd, seconds, history = _train(make_model, train, cfg, seed, num_groups, factory)
    record["seconds"]["etd_train"] = round(seconds, 1)
    record["epoch_seconds_etd"] = round(statistics.fmean(h["seconds"] for h in history), 2)
    try:
        x, y, g = as_tensors(train, "train", num_groups)
        indexed = (etd.with_index_channel(x), y, g)
        with etd.indexed_inputs():
            tied = evaluate(model, indexed, num_groups=num_groups, batch_size=cfg.eval_batch_size, device=cfg.device)
            right_tied = _correct(model, indexed, cfg)
        dropped_train, test_acc = acc(model, train), acc(model, test)
        right_dropped = _correct(model, (x, y, g), cfg)
        memorized = right_tied & ~right_dropped  # [N]
        tied_train = _accs(tied)
        record["example_tied"] = {
            "train_group_acc_tied": tied_train,
            "train_group_acc_dropped": dropped_train,
            "test_group_acc_dropped": test_acc,
            "gap": _minus(tied_train, test_acc),
            "memorized_per_group": torch.bincount(g[memorized], minlength=num_groups).tolist(),
            "generalist_channels": {n: etd.num_generalist[n] for n in cfg.layers},
            "channels": dict(etd.channels),
        }
        log(f"example-tied: train tied {tied_train}, train dropped {dropped_train}, test {test_acc} ({seconds:.0f} s)")
        started = time.perf_counter()
        loc, score_seconds, truth = localization_report(model, etd, indexed, cfg, roles, num_groups, log)
        record["localization"] = loc
        record["seconds"]["scores"] = score_seconds
        record["ties_per_group"] = {str(t): int((truth.ties[t] > 0).sum()) for t in minority}
        if cfg.per_example:
            record["per_example"] = per_example_report(model, etd, indexed, memorized, truth, cfg, minority, num_groups)
        record["seconds"]["localization"] = round(time.perf_counter() - started, 1)
    finally:
        etd.remove()
    return record


@torch.no_grad()
def _correct(model: nn.Module, data, cfg: ExampleTiedConfig) -> torch.Tensor:
    """``[N]`` bool: eval-mode predictions right, in dataset order."""
    x, y, _ = data
    was = model.training
    model.eval()
    try:
        step = cfg.eval_batch_size
        out = [model(x[s:s + step].to(cfg.device)).argmax(1).cpu() for s in range(0, x.shape[0], step)]
    finally:
        model.train(was)
    return torch.cat(out) == y if out else torch.zeros(0, dtype=torch.bool)


def _mean(values) -> Optional[float]:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


def summarize(seeds: Sequence[Mapping[str, object]], cfg: ExampleTiedConfig, roles) -> Dict[str, object]:
    """Means over seeds: per-group gaps of ERM and example-tied dropout, and each score's metrics per minority group."""
    _, minority = roles
    def mean_lists(key_path):
        lists = []
        for s in seeds:
            v = s
            for k in key_path:
                v = v[k]
            lists.append(v)
        return [_mean(col) for col in zip(*lists)]

    out: Dict[str, object] = {
        "erm_gap": mean_lists(("erm", "gap")),
        "erm_test_group_acc": mean_lists(("erm", "test_group_acc")),
        "etd_gap": mean_lists(("example_tied", "gap")),
        "etd_train_group_acc_tied": mean_lists(("example_tied", "train_group_acc_tied")),
        "etd_train_group_acc_dropped": mean_lists(("example_tied", "train_group_acc_dropped")),
        "etd_test_group_acc": mean_lists(("example_tied", "test_group_acc_dropped")),
        "scores": [],
    }
    for name in cfg.scores:
        for t in minority:
            entries = [s["localization"][name][str(t)] for s in seeds]
            keys = [k for k in entries[0] if k != "top_units" and k != "utility_top3"]
            out["scores"].append({"score": name, "group": t, **{k: _mean(e.get(k) for e in entries) for k in keys}})
    return out


def run_example_tied(make_model: Callable[[], nn.Module], train, test, cfg: ExampleTiedConfig, *, num_groups: int,
                     group_names: Optional[Sequence[str]] = None, log: Callable[[str], None] = lambda s: None):
    """Every seed's ERM vs example-tied dropout and the localization checks; JSON-ready results."""
    for name, dataset in (("train", train), ("test", test)):
        if not all(hasattr(dataset, a) for a in ("images", "labels", "group_ids")):
            raise ValueError(f"{name} must hold .images, .labels and .group_ids tensors, got {type(dataset).__name__}")
    started = time.perf_counter()
    counts = torch.bincount(torch.as_tensor(train.group_ids), minlength=num_groups).tolist()
    roles = group_roles(counts, cfg.minority)
    seeds = []
    for seed in cfg.seeds:
        seeds.append(analyze_seed(make_model, train, test, cfg, roles, num_groups, seed,
                                  log=lambda s, seed=seed: log(f"seed {seed}: {s}")))
    return {
        "config": cfg.to_dict(),
        "data": {"num_groups": num_groups, "train_group_counts": counts,
                 "group_names": list(group_names) if group_names else [f"group {g}" for g in range(num_groups)],
                 "majority": roles[0], "minority": roles[1]},
        "seeds": seeds,
        "summary": summarize(seeds, cfg, roles),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _row(values, digits: int = 1) -> str:
    return " / ".join(_num(v, digits) for v in values)


def markdown_tables(results: Mapping[str, object]) -> str:
    """Two Markdown tables: accuracies and gaps (ERM vs example-tied dropout), then each score against the known channels."""
    data, summary = results["data"], results["summary"]
    groups = "/".join(f"g{g}" for g in range(data["num_groups"]))
    lines = [f"| run | seed | train acc {groups} (%) | test acc {groups} (%) | gap train - test {groups} (points) |",
             "|---|---|---|---|---|"]
    for s in results["seeds"]:
        e, t = s["erm"], s["example_tied"]
        lines.append(f"| ERM | {s['seed']} | {_row(e['train_group_acc'])} | {_row(e['test_group_acc'])} | {_row(e['gap'])} |")
        lines.append(f"| example-tied, channels on | {s['seed']} | {_row(t['train_group_acc_tied'])} | "
                     f"{_row(t['test_group_acc_dropped'])} | {_row(t['gap'])} |")
        lines.append(f"| example-tied, dropped | {s['seed']} | {_row(t['train_group_acc_dropped'])} | "
                     f"{_row(t['test_group_acc_dropped'])} | "
                     f"{_row(_minus(t['train_group_acc_dropped'], t['test_group_acc_dropped']))} |")
    lines.append("")
    lines.append("Groups: " + ", ".join(f"g{g} = {n}" for g, n in enumerate(data["group_names"])) +
                 f"; minority {data['minority']}. Test accuracy of example-tied dropout is with the memorization "
                 "channels dropped.")
    lines.append("")
    ks = results["config"]["top_k"]
    lines.append("| score | group | AUROC tied vs rest | AUROC tied vs generalist | "
                 + " | ".join(f"top-{k} tied" for k in ks) + " | base rate | Spearman with ties |")
    lines.append("|---|---|---|---|" + "---|" * len(ks) + "---|---|")
    for r in summary["scores"]:
        lines.append(f"| {r['score']} | {r['group']} | {_num(r.get('auroc_tied_vs_rest'), 3)} | "
                     f"{_num(r.get('auroc_tied_vs_generalist'), 3)} | "
                     + " | ".join(_num(r.get(f"top{k}_tied"), 2) for k in ks)
                     + f" | {_num(r.get('base_rate_tied'), 2)} | {_num(r.get('spearman_with_ties'), 3)} |")
    per_example = [(s["seed"], t, v) for s in results["seeds"] for t, v in s.get("per_example", {}).items()]
    if per_example:
        lines.append("")
        lines.append("| seed | group | memorized examples scored | score | AUROC tied vs generalist | precision at tied "
                     "| top-1 tied | chance precision |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for seed, t, v in per_example:
            for name, m in v["summary"].items():
                lines.append(f"| {seed} | {t} | {len(v['examples'])} | {name} | {_num(m['auroc_mean'], 3)} | "
                             f"{_num(m['precision_at_tied_mean'], 2)} | {m['top1_tied']} | {_num(v['chance_precision'], 2)} |")
    return "\n".join(lines)
