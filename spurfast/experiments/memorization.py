"""The memorization study of You et al. (2025), Part I, end to end: train, score, localize,
intervene against a random control, find the examples the units hold.

For each training seed: train a model by ERM (keeping TracIn checkpoints), optionally zero
every eligible unit alone (the exact ablation oracle), rank the units of each minority group
with ``cfg.score`` (:data:`STUDY_SCORES`: the paper's group-gradient score, the target's
first-order flip rate, or that score verified by the oracle on the training split), intervene
on the top-k (``zero``, ``random_init`` for each sigma, ...) against random units of the same
size and layer distribution, and compute per-sample TracIn self-influence with its AUROC for
minority vs majority samples and the training samples each localized unit holds.

The claim checked, per minority target group g and k, on the means over seeds: intervening on
the top-k units drops g's accuracy by >= 10 points and by >= 3x both the larger majority-group
drop and the random control's drop of g.

Used by ``spurfast demo``, ``spurfast localize`` and ``benchmarks/memorization_synth.py``; this
module only computes (plots and the report live in :mod:`spurfast.report`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from spurfast.attribution import (
    DEFAULT_EXCLUDE,
    ablation_oracle,
    auroc,
    fast_score,
    average_ranks,
    group_gradient,
    localize,
    rank_all,
    self_influence,
    trace,
    verified_localize,
)
from spurfast.attribution.scores import NeuronScores, as_tensors
from spurfast.metrics import evaluate
from spurfast.train import checkpoint_path, erm, load_checkpoint

Sigma = Union[str, float]

#: How a study ranks units: the paper's group-gradient score; the target's first-order flip rate
#: on the margin (:func:`~spurfast.attribution.fast_score`); and that score verified by the exact
#: oracle on its top ``VERIFY_CANDIDATES`` units (training split only).
STUDY_SCORES = ("group_gradient", "ablation_margin_flip_rate", "verified")
VERIFY_CANDIDATES = 64


@dataclasses.dataclass
class StudyConfig:
    """Settings of one study; ``spurfast demo --help`` shows the CLI defaults."""

    seeds: Sequence[int] = (0,)
    score: str = "verified"  # see STUDY_SCORES
    epochs: int = 30
    lr: float = 2e-3
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    batch_size: int = 64
    tracin_every: int = 5
    hardest: int = 200
    ks: Sequence[int] = (1, 2, 3)
    modes: Sequence[str] = ("zero", "random_init")
    sigmas: Sequence[Sigma] = ("init",)
    repeats: int = 10
    oracle: bool = True
    self_influence: bool = True
    top_k_samples: int = 10
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    minority: Optional[Sequence[int]] = None  # default: groups with under half the mean group size
    eval_batch_size: int = 1024
    device: str = "cpu"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "tracin_every", "hardest", "repeats", "top_k_samples", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.score not in STUDY_SCORES:
            raise ValueError(f"score must be one of {STUDY_SCORES}, got {self.score!r}")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive ints, got {list(self.ks)!r}")
        self.seeds, self.ks = [int(s) for s in self.seeds], sorted(set(self.ks))
        self.sigmas = [s if s == "init" else float(s) for s in self.sigmas]

    def to_dict(self) -> Dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def group_roles(train_group_counts: Sequence[int], minority: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """``(majority, minority)`` group lists. By default a group is a minority when it has fewer
    than half the mean group size in training (Waterbirds: groups 1 and 2), and an empty group
    is neither (nothing to memorize or measure)."""
    counts = [int(c) for c in train_group_counts]
    num_groups = len(counts)
    if minority is None:
        threshold = 0.5 * sum(counts) / num_groups
        minority = [g for g, c in enumerate(counts) if 0 < c < threshold]
    else:
        minority = sorted({int(g) for g in minority})
        bad = [g for g in minority if not 0 <= g < num_groups or counts[g] == 0]
        if bad:
            raise ValueError(f"minority: groups {bad} are out of range or empty (train group counts {counts})")
    majority = [g for g, c in enumerate(counts) if c > 0 and g not in minority]
    if not minority or not majority:
        raise ValueError(f"need at least one minority and one majority group; train group counts {counts}, minority {minority}")
    return majority, minority


def lr_at(cfg: StudyConfig, step_fraction: float) -> float:
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step_fraction))
    return cfg.lr


def tracin_epochs(cfg: StudyConfig) -> List[int]:
    epochs = list(range(cfg.tracin_every, cfg.epochs + 1, cfg.tracin_every))
    if not epochs or epochs[-1] != cfg.epochs:
        epochs.append(cfg.epochs)
    return [e for e in epochs if e > 0]


def tracin_weights(cfg: StudyConfig, epochs: Sequence[int]) -> List[float]:
    """TracIn's eta_t: the mean learning rate over the epochs each checkpoint stands for, times their number."""
    weights, prev = [], 0
    for e in epochs:
        fractions = [(prev + (i + 0.5) * (e - prev) / 100) / cfg.epochs for i in range(100)]
        weights.append(statistics.fmean(lr_at(cfg, f) for f in fractions) * (e - prev))
        prev = e
    return weights


def train_with_checkpoints(
    make_model: Callable[[], nn.Module], train, test, cfg: StudyConfig, seed: int, num_groups: int, progress: bool = False
):
    """Train one model by ERM; return it with its TracIn checkpoints (state dicts), their epochs and the history."""
    torch.manual_seed(seed)
    model = make_model()
    epochs = tracin_epochs(cfg)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        history = erm(
            model, train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
            optimizer=cfg.optimizer, lr_schedule=cfg.lr_schedule, num_groups=num_groups,
            eval_datasets={"train": train, "test": test}, progress=progress, checkpoint_dir=tmp,
            device=cfg.device,
        )
        checkpoints = []
        for e in epochs:
            snapshot = make_model().to(cfg.device)
            load_checkpoint(checkpoint_path(tmp, e), snapshot)
            checkpoints.append({k: v.detach().clone() for k, v in snapshot.state_dict().items()})
    return model, checkpoints, epochs, history, time.perf_counter() - started


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = average_ranks(torch.tensor(a)), average_ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _pct(x: float) -> Optional[float]:
    return None if x is None or x != x else round(100 * x, 2)


def _unit_name(unit) -> str:
    return f"{unit[0]}:{unit[1]}"


def oracle_report(exact, per_target: Mapping[int, NeuronScores], roles, cfg: StudyConfig):
    """Per minority target, how the study's score ranks the units whose removal alone hurts it.

    ``exact``: the :class:`~spurfast.OracleResult` of every eligible unit zeroed alone on the
    training split. A unit is *group-specific* for target g when zeroing it alone drops g's
    training accuracy by >= 10 points and by >= 3x the larger majority-group drop.
    """
    majority, minority = roles
    drop = exact.drop  # [U, G]
    drops = {tuple(u): [float(d) for d in drop[i]] for i, u in enumerate(exact.units)}
    out = {"drops": {_unit_name(u): [round(d, 2) for d in v] for u, v in drops.items()}, "targets": {},
           "seconds_per_unit": round(exact.seconds_per_unit, 4)}
    for target in minority:
        score = per_target[target]
        ranking = [tuple(u) for u in localize(score, k=len(exact.units), exclude=cfg.exclude)]
        ranked_scores = [float(score[u[0]][u[1]]) for u in ranking]
        rank = {u: i for i, u in enumerate(ranking)}
        specific = sorted(
            (u for u, d in drops.items() if d[target] >= 10 and d[target] >= 3 * max(d[g] for g in majority)),
            key=lambda u: -drops[u][target],
        )
        out["targets"][str(target)] = {
            "units": len(ranking),
            "group_specific_units": len(specific),
            "best_specific": [
                {"unit": _unit_name(u), "drop": [round(d, 1) for d in drops[u]], "score_rank": rank[u]} for u in specific[:5]
            ],
            "score_top3": [{"unit": _unit_name(u), "drop": [round(d, 1) for d in drops[u]]} for u in ranking[:3]],
            "scores": ranked_scores,
            "ranked_units": [_unit_name(u) for u in ranking],
            "spearman_score_vs_target_drop": spearman(ranked_scores, [drops[u][target] for u in ranking]),
        }
    return out


def study_scores(model, train, cfg: StudyConfig, roles, num_groups: int, exact=None):
    """``({target: NeuronScores [C]}, extra)``: the units' ranking of ``cfg.score`` for each minority target.

    For ``"verified"`` the value of a unit is its place in the verified order (candidates by exact
    utility, then the rest by the first-order score), largest first.
    """
    majority, minority = roles
    extra: Dict[str, object] = {}
    if cfg.score == "group_gradient":
        scores = group_gradient(model, train, num_groups=num_groups, hardest=cfg.hardest)
        extra["selected_per_group"] = [len(scores.extra["selected"][g]) for g in range(num_groups)]
        return {t: scores.for_group(t) for t in minority}, extra
    fast = {t: fast_score(model, train, num_groups, t, majority, batch_size=cfg.eval_batch_size) for t in minority}
    if cfg.score == "ablation_margin_flip_rate":
        return fast, extra
    out = {}
    extra["verified"] = {}
    for t in minority:
        found = verified_localize(model, train, num_groups, t, k=max(cfg.ks), scores=fast[t],
                                  candidates=VERIFY_CANDIDATES, majority=majority, exclude=cfg.exclude, oracle=exact,
                                  batch_size=cfg.eval_batch_size)
        order = torch.sort(found.utility, descending=True, stable=True).indices.tolist()
        checked = set(found.candidates)
        ranking = [found.candidates[i] for i in order]
        ranking += [u for u in rank_all(fast[t], exclude=cfg.exclude) if u not in checked]
        values = {n: torch.zeros_like(v) for n, v in fast[t].items()}
        for place, u in enumerate(ranking):
            values[u.layer][u.channel] = float(len(ranking) - place)
        out[t] = NeuronScores(values, "verified", fast[t].classifier)
        extra["verified"][str(t)] = {"candidates": len(found.candidates),
                                     "utility_top": [round(float(found.utility[i]), 2) for i in order[:max(cfg.ks)]]}
    return out, extra


def self_influence_report(model, train, checkpoints, weights, localized, cfg: StudyConfig, roles):
    """TracIn self-influence over the checkpoints, its AUROCs, and the samples each unit holds."""
    majority, minority = roles
    _, _, group_ids = as_tensors(train, "train")
    influence = self_influence(model, train, checkpoints, weights)
    final_only = self_influence(model, train)
    is_minority = torch.isin(group_ids, torch.tensor(minority))
    is_majority = torch.isin(group_ids, torch.tensor(majority))
    keep = is_minority | is_majority
    out = {
        "influence": [round(float(v), 6) for v in influence],
        "auroc_minority_vs_majority": auroc(influence[keep], is_minority[keep]),
        "auroc_final_checkpoint_only": auroc(final_only[keep], is_minority[keep]),
        "auroc_per_target_vs_majority": {},
        "unit_restricted": {},
    }
    # One pass over the data per checkpoint gives every localized unit's per-sample load.
    all_units = list(dict.fromkeys(tuple(u) for t in minority for u in localized[str(t)]))
    loads = self_influence(model, train, checkpoints, weights, units=all_units, per_unit=True)  # [N, U]
    column = {u: j for j, u in enumerate(all_units)}
    k = min(cfg.top_k_samples, loads.shape[0])
    for target in minority:
        sel = (group_ids == target) | is_majority
        out["auroc_per_target_vs_majority"][str(target)] = auroc(influence[sel], (group_ids == target)[sel])
        units = [tuple(u) for u in localized[str(target)]]
        restricted = loads[:, [column[u] for u in units]].sum(1)
        top = {}
        for u in units:
            indices = torch.topk(loads[:, column[u]], k).indices
            top[_unit_name(u)] = {
                "indices": indices.tolist(),
                "groups": group_ids[indices].tolist(),
                "fraction_in_target": float((group_ids[indices] == target).double().mean()),
                "fraction_minority": float(is_minority[indices].double().mean()),
            }
        out["unit_restricted"][str(target)] = {
            "auroc_target_vs_majority": auroc(restricted[sel], (group_ids == target)[sel]),
            "top_samples": top,
        }
    return out


def analyze(model, train, test, cfg: StudyConfig, roles, num_groups: int, seed: int = 0,
            checkpoints=None, weights=None, log: Callable[[str], None] = lambda s: None) -> Tuple[Dict, List[Dict]]:
    """Everything after training, for one trained model: ``(run, trace rows)``."""
    majority, minority = roles
    model.eval()
    timings = {}
    before = {
        name: evaluate(model, ds, num_groups=num_groups, batch_size=cfg.eval_batch_size).group_acc.tolist()
        for name, ds in (("train", train), ("test", test))
    }
    exact = None
    if cfg.oracle:
        started = time.perf_counter()
        exact = ablation_oracle(model, train, num_groups, exclude=cfg.exclude, batch_size=cfg.eval_batch_size)
        timings["oracle"] = time.perf_counter() - started
        log(f"oracle: zeroed {len(exact.units)} units one at a time in {timings['oracle']:.1f} s "
            f"({1000 * exact.seconds_per_unit:.0f} ms per unit)")
    started = time.perf_counter()
    per_target, score_extra = study_scores(model, train, cfg, roles, num_groups, exact)
    timings["score"] = time.perf_counter() - started
    log(f"scored the units with {cfg.score} in {timings['score']:.1f} s")
    localized, rows = {}, []
    started = time.perf_counter()
    for target in minority:
        units = localize(per_target[target], k=max(cfg.ks), exclude=cfg.exclude)
        localized[str(target)] = [list(u) for u in units]
        result = trace(
            model, units, {"train": train, "test": test}, modes=cfg.modes, sigmas=cfg.sigmas, repeats=cfg.repeats,
            ks=cfg.ks, num_groups=num_groups, seed=1000 * seed, batch_size=cfg.eval_batch_size,
        )
        rows += [dict(r, seed=seed, target=target) for r in result.rows]
    timings["trace"] = time.perf_counter() - started
    log(f"traced {len(minority)} minority groups x {len(cfg.modes)} modes in {timings['trace']:.1f} s")
    oracle = None if exact is None else oracle_report(exact, per_target, roles, cfg)
    influence = None
    if cfg.self_influence:
        started = time.perf_counter()
        if checkpoints is None:  # a given model: its final weights only, at unit learning rate
            weights = 1.0
        influence = self_influence_report(model, train, checkpoints, weights, localized, cfg, roles)
        timings["self_influence"] = time.perf_counter() - started
        log(f"self-influence AUROC {influence['auroc_minority_vs_majority']:.3f} in {timings['self_influence']:.1f} s")
    run = {
        "seed": seed,
        "before_group_acc": {k: [_pct(a) for a in v] for k, v in before.items()},
        "score": cfg.score,
        "selected_per_group": score_extra.get("selected_per_group"),
        "scores": {str(t): {name: v.tolist() for name, v in sc.items()} for t, sc in per_target.items()},
        "score_extra": {k: v for k, v in score_extra.items() if k != "selected_per_group"},
        "localized": {t: [_unit_name(u) for u in us] for t, us in localized.items()},
        "self_influence": influence,
        "oracle": oracle,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    return run, rows


def settings_of(rows) -> List[Tuple[str, Optional[Sigma]]]:
    """The (mode, sigma) settings in ``rows``, in the order they were run."""
    return list(dict.fromkeys((r["mode"], r["sigma"]) for r in rows))


def summarize(rows, roles, ks) -> List[Dict[str, object]]:
    """Per (target, mode, sigma, k, split): means over seeds of the per-seed mean changes, in points."""
    majority, minority = roles
    index: Dict[tuple, List[float]] = {}
    for r in rows:
        key = (r["target"], r["mode"], r["sigma"], r["k"], r["split"], r["units"], r["group"])
        index.setdefault(key, []).append(r["change_mean"])
    out = []
    for target in minority:
        for mode, sigma in settings_of(rows):
            for k in ks:
                for split in ("train", "test"):
                    def drop(units, group):
                        per_seed = [-100 * c for c in index.get((target, mode, sigma, k, split, units, group), [])]
                        if not per_seed:
                            return float("nan"), float("nan"), []
                        std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                        return statistics.fmean(per_seed), std, per_seed

                    target_drop, target_std, per_seed = drop("selected", target)
                    majority_drop = {str(g): drop("selected", g)[0] for g in majority}
                    other = {str(g): drop("selected", g)[0] for g in minority if g != target}
                    control, control_std, _ = drop("random", target)
                    worst_majority = max(majority_drop.values())
                    met = target_drop >= 10 and target_drop >= 3 * worst_majority
                    met = met and (control != control or target_drop >= 3 * control)
                    out.append({
                        "target": target, "mode": mode, "sigma": sigma, "k": k, "split": split,
                        "target_drop": round(target_drop, 2), "target_drop_std_over_seeds": round(target_std, 2),
                        "target_drop_per_seed": [round(d, 2) for d in per_seed],
                        "majority_drop": {g: round(v, 2) for g, v in majority_drop.items()},
                        "other_minority_drop": {g: round(v, 2) for g, v in other.items()},
                        "control_target_drop": round(control, 2), "control_std_over_seeds": round(control_std, 2),
                        "claim_met": bool(met),
                    })
    return out


def run_study(
    make_model: Callable[[], nn.Module],
    train,
    test,
    cfg: StudyConfig,
    *,
    num_groups: int,
    group_names: Optional[Sequence[str]] = None,
    model: Optional[nn.Module] = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    on_trained: Optional[Callable[[int, nn.Module, Dict[str, object]], None]] = None,
) -> Dict[str, object]:
    """Run the study for every seed in ``cfg.seeds`` and return every number as plain JSON-able data.

    ``make_model()`` builds a fresh, untrained model. With ``model`` (already trained, e.g. from
    a user's checkpoint) nothing is trained: one analysis of that model, with self-influence
    from its final weights only (there are no training checkpoints).

    ``on_trained(seed, model, info)``, when given, is called with each trained model before its
    analysis (``info``: ``history``, ``seconds``), e.g. to keep a copy for later training; it
    must not change ``model``.
    """
    _, _, train_groups = as_tensors(train, "train", num_groups=num_groups)
    _, _, test_groups = as_tensors(test, "test", num_groups=num_groups)
    train_counts = torch.bincount(train_groups, minlength=num_groups).tolist()
    roles = group_roles(train_counts, cfg.minority)
    started = time.perf_counter()
    runs, rows = [], []
    seeds = cfg.seeds if model is None else cfg.seeds[:1]
    for seed in seeds:
        if model is None:
            log(f"seed {seed}: training {cfg.epochs} epochs of ERM")
            trained, checkpoints, ck_epochs, history, seconds = train_with_checkpoints(
                make_model, train, test, cfg, seed, num_groups, progress=progress)
            weights = tracin_weights(cfg, ck_epochs)
            log(f"seed {seed}: trained in {seconds:.1f} s")
        else:
            trained, checkpoints, ck_epochs, history, seconds, weights = model, None, [], [], None, None
        if on_trained is not None:
            on_trained(seed, trained, {"history": history, "seconds": seconds})
        run, seed_rows = analyze(trained, train, test, cfg, roles, num_groups, seed=seed,
                                 checkpoints=checkpoints, weights=weights, log=lambda s: log(f"seed {seed}: {s}"))
        run["train_seconds"] = None if seconds is None else round(seconds, 1)
        run["tracin_epochs"], run["tracin_lr_weights"] = ck_epochs, weights
        run["history"] = [_history_entry(h) for h in history]
        runs.append(run)
        rows += seed_rows
    summary = summarize(rows, roles, cfg.ks)
    influence = [r["self_influence"]["auroc_minority_vs_majority"] for r in runs if r["self_influence"]]
    return {
        "config": cfg.to_dict(),
        "data": {
            "num_groups": num_groups,
            "group_names": list(group_names) if group_names else [f"group {g}" for g in range(num_groups)],
            "train_group_counts": train_counts,
            "test_group_counts": torch.bincount(test_groups, minlength=num_groups).tolist(),
            "majority": roles[0],
            "minority": roles[1],
        },
        "runs": runs,
        "summary": summary,
        "self_influence_auroc": {"per_seed": influence, "mean": statistics.fmean(influence)} if influence else None,
        "trace_rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _history_entry(h: Mapping[str, object]) -> Dict[str, object]:
    out = {k: h[k] for k in ("epoch", "loss", "train_running_acc", "lr", "seconds") if k in h}
    for split in ("train", "test"):
        if split in h:
            out[f"{split}_group_acc"] = [_pct(a) for a in h[split]["group_acc"]]
    return out
