"""Which score finds the neurons whose removal matters? Every score against the exact oracle.

For each training seed: train by ERM, measure the exact ablation oracle on the training split
(every eligible unit zeroed alone), compute each score, and for each minority target group
report the score's Spearman correlation with the oracle's target drop over all eligible units,
the rank of the first *group-specific* unit (zeroing it alone drops the target's training
accuracy by >= 10 points and by >= 3x the larger majority drop), the oracle drops of its top-1
and top-3, and the paper's claim read out by :func:`~spurfast.attribution.trace` on train and
test. Then a split-half check of verified localization, and the samples each verified unit
holds (first-order against exact).

Used by ``benchmarks/localization.py``; computes only (tables live in :mod:`spurfast.report`).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from spurfast.attribution import (
    ablation_oracle,
    ablation_scores,
    fast_score,
    grad_sq_contrast,
    group_gradient,
    group_profile,
    iterative_localize,
    localize,
    magnitude,
    rank_all,
    memorized_examples,
    trace,
    verified_localize,
)
from spurfast.attribution.scores import NeuronScores, Unit, as_tensors
from spurfast.experiments.memorization import StudyConfig, group_roles, spearman, summarize, train_with_checkpoints
from spurfast.metrics import evaluate

#: Scores compared, in table order. "verified" and "iterative" are built on FAST_DEFAULT.
SCORES = (
    "magnitude", "group_gradient", "grad_sq_contrast",
    "ablation_loss_mean", "ablation_loss_flip_rate", "ablation_loss_contrast",
    "ablation_margin_mean", "ablation_margin_flip_rate", "ablation_margin_contrast",
    "ablation_margin_flip_rate_x1.5", "verified", "iterative",
)
#: flip_scale of "ablation_margin_flip_rate_x1.5": chosen on models of the same seeds trained with
#: one thread (not the benchmark's), where it beat the plain flip rate on both counts.
FLIP_SCALE = 1.5
FAST_DEFAULT = "ablation_margin_flip_rate"  # verify.fast_score's default (ties broken by the harm)


@dataclasses.dataclass
class LocalizationConfig:
    """Settings of the localization benchmark; the training settings are a :class:`StudyConfig`'s."""

    study: StudyConfig
    candidates: int = 64
    penalty: float = 3.0
    scores: Sequence[str] = SCORES
    split_half: bool = True
    split_seed: int = 0
    #: None: the exact oracle over every eligible unit. An int: over a pool only, the union of each
    #: score's top ``pool_top`` units, the fast score's top ``candidates`` and ``pool_random`` units
    #: drawn uniformly (seeded); Spearman is then taken over the uniform draw, and a score's first
    #: group-specific unit is looked for in its top ``pool_top`` (for a model with too many units).
    pool_top: Optional[int] = None
    pool_random: int = 0
    #: None: scores, oracle and the train readout use the whole training split. An int: a probe of
    #: it, every minority sample and this many samples (seeded) of each majority group.
    probe_majority: Optional[int] = None
    #: Scores whose selections get the full trace (study.modes x ks); the others get k=1, "zero"
    #: only. None: every score gets the full trace.
    full_trace: Optional[Sequence[str]] = None

    def __post_init__(self):
        for name in ("pool_top", "probe_majority"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if self.pool_top is not None and self.pool_top < max(3, max(self.study.ks)):
            raise ValueError(f"pool_top must be >= max(3, max(ks)) = {max(3, max(self.study.ks))}, got {self.pool_top}")
        if isinstance(self.pool_random, bool) or not isinstance(self.pool_random, int) or self.pool_random < 0:
            raise ValueError(f"pool_random must be a non-negative int, got {self.pool_random!r}")
        unknown = [s for s in self.scores if s not in SCORES] + [s for s in (self.full_trace or ()) if s not in SCORES]
        if unknown:
            raise ValueError(f"scores/full_trace: unknown {unknown}; expected names from {SCORES}")

    def to_dict(self) -> Dict[str, object]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "study"}
        out["scores"] = list(self.scores)
        out["full_trace"] = None if self.full_trace is None else list(self.full_trace)
        out["study"] = self.study.to_dict()
        return out


def specific_units(drop: torch.Tensor, units: Sequence[Unit], target: int, majority: Sequence[int]) -> List[Unit]:
    """Units whose exact drop of ``target`` is >= 10 points and >= 3x the larger majority drop."""
    worst = drop[:, list(majority)].max(1).values
    ok = (drop[:, target] >= 10) & (drop[:, target] >= 3 * worst)
    return [u for u, keep in zip(units, ok.tolist()) if keep]


def _as_score(values: NeuronScores, target: int) -> NeuronScores:
    return values.for_group(target) if values.grouped else values


def rank_report(ranking: Sequence[Unit], values: Optional[Sequence[float]], oracle, target: int, majority,
                specific: Sequence[Unit], sample=None, depth: Optional[int] = None) -> Dict[str, object]:
    """Spearman of ``values`` (aligned with ``ranking``) with the oracle's target drop, the 1-based rank
    of the first specific unit, top-1/top-3 oracle drops.

    With a pooled oracle: ``sample`` (a set of units the oracle measured, drawn uniformly) is what
    the Spearman runs over, and the first specific unit is looked for in ``ranking[:depth]``.
    """
    index = {u: i for i, u in enumerate(oracle.units)}
    drop = oracle.drop
    specific = set(specific)
    first = next((i + 1 for i, u in enumerate(ranking[:depth]) if u in specific), None)
    pairs = [(v, u) for v, u in zip(values or (), ranking) if sample is None or u in sample]
    out = {
        "spearman": None if values is None else spearman([v for v, _ in pairs],
                                                         [float(drop[index[u], target]) for _, u in pairs]),
        "rank_first_specific": first if specific else None,
        "top1_specific": bool(ranking) and ranking[0] in specific,
        "top_units": [f"{u.layer}:{u.channel}" for u in ranking[:3]],
        "top1_drop": [round(float(d), 2) for d in drop[index[ranking[0]]]],
        "top3_drops": [[round(float(d), 2) for d in drop[index[u]]] for u in ranking[:3]],
    }
    if out["spearman"] is not None and out["spearman"] != out["spearman"]:
        out["spearman"] = None  # constant score
    return out


def compute_rankings(model, train, cfg: LocalizationConfig, roles, num_groups: int, log=lambda s: None, *,
                     names: Optional[Sequence[str]] = None, oracle=None, fast=None):
    """``{score: {target: (ranking, values or None, extra)}}`` and the seconds each score took.

    ``names``: the scores to compute (default ``cfg.scores``); ``oracle``: exact rows verified
    localization may reuse; ``fast``: ``{target: fast_score}`` already computed.
    """
    majority, minority = roles
    exclude = cfg.study.exclude
    names = list(cfg.scores if names is None else names)
    out: Dict[str, Dict[int, tuple]] = {s: {} for s in names}
    seconds: Dict[str, float] = {}

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - started, 3)
        return value

    def put(name, per_target_scores):
        for target, score in per_target_scores.items():
            ranking = rank_all(score, exclude=exclude)
            out[name][target] = (ranking, [float(score[u.layer][u.channel]) for u in ranking], {})

    wanted = set(names)
    if "magnitude" in wanted:
        m = timed("magnitude", lambda: magnitude(model))
        put("magnitude", {t: m for t in minority})
    if "group_gradient" in wanted:
        gg = timed("group_gradient", lambda: group_gradient(model, train, num_groups, hardest=cfg.study.hardest))
        put("group_gradient", {t: gg.for_group(t) for t in minority})
    if "grad_sq_contrast" in wanted:
        profile = timed("grad_sq_contrast", lambda: group_profile(model, train, num_groups))
        put("grad_sq_contrast", {t: grad_sq_contrast(profile, t, majority) for t in minority})
    for objective in ("loss", "margin"):
        names = [f"ablation_{objective}_{s}" for s in ("mean", "flip_rate", "contrast")]
        if not wanted & set(names):
            continue
        scores = timed(f"ablation_{objective}", lambda: ablation_scores(model, train, num_groups, objective))
        if names[0] in wanted:
            put(names[0], {t: scores.harm.for_group(t) for t in minority})
        if names[1] in wanted:
            put(names[1], {t: scores.flip_rate.for_group(t) for t in minority})
        if names[2] in wanted:
            put(names[2], {t: scores.contrast(t, majority) for t in minority})
    if "ablation_margin_flip_rate_x1.5" in wanted:
        scaled = timed("ablation_margin_x1.5", lambda: ablation_scores(model, train, num_groups, "margin",
                                                                        flip_scale=FLIP_SCALE))
        put("ablation_margin_flip_rate_x1.5", {t: scaled.flip_rate.for_group(t) for t in minority})
    if "verified" in wanted:
        started = time.perf_counter()
        for t in minority:
            score = fast[t] if fast is not None else fast_score(model, train, num_groups, t, majority)
            found = verified_localize(model, train, num_groups, t, k=3, scores=score, candidates=cfg.candidates,
                                      majority=majority, penalty=cfg.penalty, exclude=exclude, oracle=oracle)
            checked = set(found.candidates)
            rest = [u for u in rank_all(score, exclude=exclude) if u not in checked]
            order = torch.sort(found.utility, descending=True, stable=True).indices.tolist()
            ranking = [found.candidates[i] for i in order] + rest
            # ranks stand in for scores: the verified candidates by utility, then the fast order
            values = [float(len(ranking) - i) for i in range(len(ranking))]
            extra = {"candidates": len(found.candidates), "oracle_seconds": round(found.seconds["oracle"], 3),
                     "utility_top3": [round(float(found.utility[i]), 2) for i in order[:3]]}
            out["verified"][t] = (ranking, values, extra)
        seconds["verified"] = round(time.perf_counter() - started, 3)
    if "iterative" in wanted:
        started = time.perf_counter()
        for t in minority:
            units = iterative_localize(model, train, num_groups, t, k=max(cfg.study.ks), majority=majority,
                                       exclude=exclude)
            out["iterative"][t] = (units, None, {})
        seconds["iterative"] = round(time.perf_counter() - started, 3)
    log("scores: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return out, seconds


def _halves(group_ids: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(a, b)``: each group's samples split in two halves at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = [], []
    for g in torch.unique(group_ids).tolist():
        members = (group_ids == g).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        half = (len(members) + 1) // 2
        a.append(members[:half])
        b.append(members[half:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


def split_half(model, train, cfg: LocalizationConfig, roles, num_groups: int, seed: int) -> Dict[str, object]:
    """Select and verify on half A of each group's training samples, read the exact drops out on half B."""
    majority, minority = roles
    x, y, g = as_tensors(train, "train")
    a, b = _halves(g, cfg.split_seed + seed)
    half_a, half_b = (x[a], y[a], g[a]), (x[b], y[b], g[b])
    out = {}
    for t in minority:
        fast = fast_score(model, half_a, num_groups, t, majority)
        found = verified_localize(model, half_a, num_groups, t, k=max(cfg.study.ks), scores=fast,
                                  candidates=cfg.candidates, majority=majority, penalty=cfg.penalty,
                                  exclude=cfg.study.exclude)
        unverified = localize(fast, k=max(cfg.study.ks), exclude=cfg.study.exclude)
        entry = {}
        for name, units in (("verified", found.units), ("unverified", unverified)):
            on_a = ablation_oracle(model, half_a, num_groups, units)
            on_b = ablation_oracle(model, half_b, num_groups, units)
            entry[name] = {
                "units": [f"{u.layer}:{u.channel}" for u in units],
                "drop_on_a": [[round(float(d), 2) for d in row] for row in on_a.drop],
                "drop_on_b": [[round(float(d), 2) for d in row] for row in on_b.drop],
                "top1_specific_on_a": bool(specific_units(on_a.drop[:1], units[:1], t, majority)),
                "top1_specific_on_b": bool(specific_units(on_b.drop[:1], units[:1], t, majority)),
            }
        out[str(t)] = entry
    return out


def claim_cells(rows, target: int, majority: Sequence[int]) -> List[Dict[str, object]]:
    """Per (mode, sigma, k, split) of one seed's trace rows: target, majority and control drops, and the claim."""
    cells: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        key = (r["mode"], r["sigma"], r["k"], r["split"])
        cell = cells.setdefault(key, {})
        if r["units"] == "selected":
            cell[f"g{r['group']}"] = -100 * r["change_mean"]
        elif r["group"] == target:
            cell["control"] = -100 * r["change_mean"]
    out = []
    for (mode, sigma, k, split), cell in cells.items():
        drop = cell[f"g{target}"]
        worst = max(cell[f"g{m}"] for m in majority)
        control = cell.get("control", float("nan"))
        met = drop >= 10 and drop >= 3 * worst and (control != control or drop >= 3 * control)
        out.append({"mode": mode, "sigma": sigma, "k": k, "split": split, "target_drop": round(drop, 2),
                    "majority_drop": round(worst, 2), "control_drop": round(control, 2), "claim_met": bool(met)})
    return out


def probe_subset(train, roles, per_majority: Optional[int], seed: int):
    """``train`` itself, or ``(x, y, g)`` of every minority sample and ``per_majority`` seeded draws
    of each majority group (all of a group that has fewer)."""
    if per_majority is None:
        return train
    x, y, g = as_tensors(train, "train")
    generator = torch.Generator().manual_seed(10_007 + seed)
    keep = []
    for group in torch.unique(g).tolist():
        members = (g == group).nonzero().squeeze(1)
        if group in roles[0] and len(members) > per_majority:
            members = members[torch.randperm(len(members), generator=generator)[:per_majority]]
        keep.append(members)
    index = torch.cat(keep).sort().values
    return x[index], y[index], g[index]


def unit_pool(model, rankings, fast, cfg: LocalizationConfig, seed: int) -> Tuple[List[Unit], set, int]:
    """The pooled oracle's units (each ranking's top ``pool_top``, the fast scores' top ``candidates``,
    a uniform draw of ``pool_random`` eligible units), the set of the drawn ones and the number of eligible units."""
    exclude = cfg.study.exclude
    pool: Dict[Unit, None] = {}
    for per_target in rankings.values():
        for ranking, _, _ in per_target.values():
            pool.update(dict.fromkeys(ranking[:cfg.pool_top]))
    for score in fast.values():
        pool.update(dict.fromkeys(rank_all(score, exclude=exclude)[:cfg.candidates]))
    eligible = sorted(rank_all(magnitude(model), exclude=exclude))
    generator = torch.Generator().manual_seed(20_011 + seed)
    drawn = [eligible[i] for i in torch.randperm(len(eligible), generator=generator)[:cfg.pool_random].tolist()]
    pool.update(dict.fromkeys(drawn))
    return sorted(pool), set(drawn), len(eligible)


def analyze_seed(model, train, test, cfg: LocalizationConfig, roles, num_groups: int, seed: int,
                 log: Callable[[str], None] = lambda s: None):
    """Everything for one trained model: ``(cases, trace rows, seed record)``."""
    majority, minority = roles
    study = cfg.study
    model.eval()
    record: Dict[str, object] = {"seed": seed, "seconds": {}}
    record["before_group_acc"] = {
        name: [round(100 * a, 2) for a in evaluate(model, ds, num_groups=num_groups).group_acc.tolist()]
        for name, ds in (("train", train), ("test", test))
    }
    probe = probe_subset(train, roles, cfg.probe_majority, seed)
    if probe is not train:
        record["probe_group_counts"] = torch.bincount(probe[2], minlength=num_groups).tolist()
        train = probe  # scores, oracle, verification and the train readout all run on the probe
    sample, depth = None, None
    if cfg.pool_top is None:
        oracle = ablation_oracle(model, train, num_groups, exclude=study.exclude)
        rankings, score_seconds = compute_rankings(model, train, cfg, roles, num_groups, log)
    else:
        late = [s for s in cfg.scores if s in ("verified", "iterative")]
        rankings, score_seconds = compute_rankings(model, train, cfg, roles, num_groups, log,
                                                   names=[s for s in cfg.scores if s not in late])
        started = time.perf_counter()
        fast = {t: fast_score(model, train, num_groups, t, majority) for t in minority} if late else {}
        score_seconds["fast_score"] = round(time.perf_counter() - started, 3)
        units, sample, eligible = unit_pool(model, rankings, fast, cfg, seed)
        oracle = ablation_oracle(model, train, num_groups, units=units)
        if late:
            more, more_seconds = compute_rankings(model, train, cfg, roles, num_groups, log, names=late,
                                                  oracle=oracle, fast=fast)
            rankings.update(more)
            score_seconds.update(more_seconds)
        rankings = {name: rankings[name] for name in cfg.scores}
        depth = cfg.pool_top
        record["pool"] = {"units": len(units), "drawn": len(sample),
                          "eligible": eligible}
    record["seconds"]["oracle"] = round(oracle.seconds, 2)
    record["oracle_seconds_per_unit"] = round(oracle.seconds_per_unit, 4)
    record["oracle"] = oracle.to_dict()
    log(f"oracle: {len(oracle.units)} units in {oracle.seconds:.1f} s ({oracle.seconds_per_unit * 1000:.0f} ms per unit)")
    record["seconds"]["scores"] = score_seconds
    specific = {t: specific_units(oracle.drop, oracle.units, t, majority) for t in minority}
    record["group_specific_units"] = {str(t): [f"{u.layer}:{u.channel}" for u in specific[t]] for t in minority}
    cases, rows = [], []
    cache: Dict[tuple, list] = {}
    started = time.perf_counter()
    for name in cfg.scores:
        for t in minority:
            ranking, values, extra = rankings[name][t]
            case = {"seed": seed, "group": t, "score": name, "oracle_specific_units": len(specific[t])}
            # with a pooled oracle, verified's exactly measured candidates bound the search
            verified_depth = extra.get("candidates", depth) if name == "verified" and depth is not None else depth
            case.update(rank_report(ranking, values, oracle, t, majority, specific[t], sample, verified_depth))
            case.update(extra)
            full = cfg.full_trace is None or name in cfg.full_trace
            ks, modes = (study.ks, study.modes) if full else ([1], ["zero"])
            score_rows = []
            for k in ks:
                key = (t, tuple(ranking[:k]), tuple(modes))
                if key not in cache:
                    result = trace(model, ranking[:k], {"train": train, "test": test}, modes=modes,
                                   sigmas=study.sigmas, repeats=study.repeats, ks=[k], num_groups=num_groups,
                                   seed=1000 * seed, batch_size=study.eval_batch_size)
                    cache[key] = result.rows
                score_rows += cache[key]
            case["claim"] = claim_cells(score_rows, t, majority)
            rows += [dict(r, seed=seed, target=t, score=name) for r in score_rows]
            cases.append(case)
    record["seconds"]["trace"] = round(time.perf_counter() - started, 2)
    log(f"traced {len(cache)} distinct selections in {record['seconds']['trace']:.1f} s")
    if cfg.split_half:
        started = time.perf_counter()
        record["split_half"] = split_half(model, train, cfg, roles, num_groups, seed)
        record["seconds"]["split_half"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    record["memorized"] = {}
    if "verified" in rankings:
        for t in minority:
            units = rankings["verified"][t][0][: max(study.ks)]
            found = memorized_examples(model, train, units, num_groups)
            record["memorized"][str(t)] = [
                {k: v for k, v in m.to_dict().items() if k in ("unit", "precision", "recall", "exact_groups")}
                | {"flagged": len(m.flagged), "exact": len(m.exact), "confirmed": len(m.confirmed)}
                for m in found
            ]
    record["seconds"]["memorized"] = round(time.perf_counter() - started, 2)
    return cases, rows, record


def summarize_cases(cases, rows, roles, ks, scores) -> List[Dict[str, object]]:
    """Per (score, group): counts and means over seeds, and the claim on the seed means (k=1, train)."""
    majority, minority = roles
    out = []
    for name in scores:
        claims = summarize([r for r in rows if r["score"] == name], roles, ks)
        for t in minority:
            mine = [c for c in cases if c["score"] == name and c["group"] == t]
            rhos = [c["spearman"] for c in mine if c["spearman"] is not None]
            with_specific = [c for c in mine if c["oracle_specific_units"] > 0]
            out.append({
                "score": name, "group": t, "seeds": len(mine),
                "top1_specific": sum(c["top1_specific"] for c in mine),
                "seeds_with_specific_unit": len(with_specific),
                "spearman_mean": round(statistics.fmean(rhos), 3) if rhos else None,
                "rank_first_specific": [c["rank_first_specific"] for c in mine],
                "top1_target_drop_mean": round(statistics.fmean(c["top1_drop"][t] for c in mine), 2),
                # scores outside cfg.full_trace have k=1 "zero" cells only
                "claims": [c for c in claims if c["target"] == t and c["target_drop"] == c["target_drop"]],
            })
    return out


def run_localization(make_model: Callable[[], nn.Module], train, test, cfg: LocalizationConfig, *, num_groups: int,
                     group_names: Optional[Sequence[str]] = None, log: Callable[[str], None] = lambda s: None):
    """Train one model per seed and compare every score with the oracle; returns the JSON-ready results."""
    started = time.perf_counter()
    study = cfg.study
    _, _, train_groups = as_tensors(train, "train", num_groups)
    counts = torch.bincount(train_groups, minlength=num_groups).tolist()
    roles = group_roles(counts, study.minority)
    cases, rows, seeds = [], [], []
    for seed in study.seeds:
        model, _, _, history, seconds = train_with_checkpoints(make_model, train, test, study, seed, num_groups)
        log(f"seed {seed}: trained in {seconds:.1f} s")
        seed_cases, seed_rows, record = analyze_seed(model, train, test, cfg, roles, num_groups, seed,
                                                     log=lambda s: log(f"seed {seed}: {s}"))
        record["train_seconds"] = round(seconds, 1)
        cases += seed_cases
        rows += seed_rows
        seeds.append(record)
    return {
        "config": cfg.to_dict(),
        "data": {"num_groups": num_groups, "train_group_counts": counts,
                 "group_names": list(group_names) if group_names else [f"group {g}" for g in range(num_groups)],
                 "majority": roles[0], "minority": roles[1]},
        "cases": cases,
        "summary": summarize_cases(cases, rows, roles, study.ks, cfg.scores),
        "seeds": seeds,
        "trace_rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
