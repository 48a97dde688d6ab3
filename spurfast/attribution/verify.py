"""Localization checked against the exact answer, and which samples each localized unit holds.

* :func:`verified_localize` -- rank every eligible unit by a fast score, confirm the top
  ``candidates`` with the exact oracle, return the top-k by exact effect on the target group
  minus a penalty for the majority groups' effect.
* :func:`iterative_localize` -- zero the best unit, recompute the first-order statistic with
  it removed, take the next (the greedy procedure of Maini et al. 2023, per group).
* :func:`memorized_examples` -- for each unit, the samples whose prediction flips when it is
  zeroed: first-order from ``last_ablation``, then exactly; precision and recall of the first.

All of them read only the data they are given: pass the training split to select on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from spurfast.attribution.ablation import ablation_scores, first_order_effects
from spurfast.attribution.interventions import intervene
from spurfast.attribution.localize import localize, rank_all
from spurfast.attribution.objectives import check_objective
from spurfast.attribution.oracle import OracleResult, ablation_oracle
from spurfast.attribution.scores import (
    DEFAULT_EXCLUDE,
    NeuronScores,
    Unit,
    _as_units,
    _check_group,
    _check_num_groups,
    as_tensors,
)

FAST_SCORES = ("flip_rate", "flip_rate_contrast", "harm", "harm_contrast")


def _majority_of(counts: torch.Tensor, target: int, majority: Optional[Sequence[int]]) -> List[int]:
    num_groups = counts.shape[0]
    if majority is None:
        majority = [g for g in range(num_groups) if g != target and int(counts[g]) > 0]
    majority = [_check_group(m, num_groups, "majority") for m in majority]
    if not majority or target in majority:
        raise ValueError(f"majority must be non-empty and exclude the target {target}, got {majority}")
    return majority


def fast_score(model: nn.Module, dataset, num_groups: int, target: int, majority: Optional[Sequence[int]] = None,
               score: str = "flip_rate", objective: str = "margin", **kwargs) -> NeuronScores:
    """A first-order ablation score ``[C]`` for ``target`` from one pass: one of :data:`FAST_SCORES`.

    ``"flip_rate"`` (the default, the best of them against the exact oracle in
    ``benchmarks/localization.py``): the target's predicted flip rate, ties (most units flip no
    sample) broken by its harm, the mean first-order margin loss. The contrasts subtract the
    largest majority group's value.
    """
    if score not in FAST_SCORES:
        raise ValueError(f"score must be one of {FAST_SCORES}, got {score!r}")
    scores = ablation_scores(model, dataset, num_groups, objective, **kwargs)
    if score.endswith("_contrast"):
        return scores.contrast(target, majority, of=score[: -len("_contrast")])
    values = getattr(scores, score).for_group(target)
    if score == "flip_rate":
        harm = scores.harm.for_group(target)
        scale = max(float(t.abs().max()) for t in harm.values()) or 1.0
        # flip rates are multiples of 1/n, far apart against 1e-9
        values = NeuronScores({n: v + 1e-9 * harm[n] / scale for n, v in values.items()}, "ablation_flip_rate_then_harm",
                              values.classifier)
    return values


def utility(drop: torch.Tensor, target: int, majority: Sequence[int], penalty: float) -> torch.Tensor:
    """``[U]``: the target's exact accuracy drop minus ``penalty`` x the larger majority drop (if positive)."""
    return drop[:, target] - penalty * drop[:, list(majority)].max(1).values.clamp(min=0)


@dataclasses.dataclass
class VerifiedLocalization:
    """Result of :func:`verified_localize`.

    ``units``: the top-k, best first; ``candidates``: the units checked, in fast-score order;
    ``utility [len(candidates)]``; ``oracle``: the exact effects of the candidates.
    """

    target: int
    majority: List[int]
    units: List[Unit]
    candidates: List[Unit]
    utility: torch.Tensor
    oracle: OracleResult
    penalty: float
    seconds: Dict[str, float]


def verified_localize(
    model: nn.Module,
    dataset,
    num_groups: int,
    target: int,
    k: int = 3,
    *,
    scores: Optional[Union[NeuronScores, Dict[str, torch.Tensor]]] = None,
    candidates: int = 64,
    majority: Optional[Sequence[int]] = None,
    penalty: float = 3.0,
    mode: str = "zero",
    objective: str = "margin",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    oracle: Optional[OracleResult] = None,
    batch_size: int = 256,
    max_rows: int = 2048,
) -> VerifiedLocalization:
    """The top-``k`` units for ``target`` by exact effect, among the ``candidates`` best of a fast score.

    ``scores``: a ``[C]`` score (or ``[G, C]``, its row ``target`` is used) to rank by; default
    the target's first-order flip rate on the margin (:func:`fast_score`). The exact oracle then
    removes each candidate alone and ranks them by ``target drop - penalty * max(majority drop, 0)``
    (accuracy points; ties keep the fast-score order). ``penalty=3`` mirrors the group-specific
    criterion (the target's drop at least 3x the larger majority drop). ``oracle``: an
    :class:`~spurfast.OracleResult` of the same model, data, ``mode`` and objective already
    measured (e.g. over every unit); its rows are reused for the candidates it covers.

    Example::

        >>> import torch, torch.nn as nn, spurfast as sf
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> found = sf.verified_localize(model, data, num_groups=4, target=1, k=2, candidates=5)
        >>> len(found.units), len(found.candidates)
        (2, 5)
    """
    _check_num_groups(num_groups)
    target = _check_group(target, num_groups, "target")
    check_objective(objective)
    for name, value in (("k", k), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty >= 0:
        raise ValueError(f"penalty must be a number >= 0, got {penalty!r}")
    _, _, g = as_tensors(dataset, "dataset", num_groups)
    counts = torch.bincount(g, minlength=num_groups)
    if int(counts[target]) == 0:
        raise ValueError(f"target: group {target} has no samples in the dataset")
    majority = _majority_of(counts, target, majority)
    seconds: Dict[str, float] = {}
    started = time.perf_counter()
    if scores is None:
        scores = fast_score(model, dataset, num_groups, target, majority, objective=objective, batch_size=batch_size)
    group = target if isinstance(scores, NeuronScores) and scores.grouped else None
    ranked = rank_all(scores, group=group, exclude=exclude)[:candidates]
    seconds["score"] = time.perf_counter() - started
    started = time.perf_counter()
    known = set(oracle.units) if oracle is not None else set()
    if oracle is not None and oracle.mode == mode and oracle.objective == objective and set(ranked) <= known:
        rows = [oracle.index(u) for u in ranked]
        oracle = dataclasses.replace(
            oracle, units=list(ranked), acc_after=oracle.acc_after[rows], objective_after=oracle.objective_after[rows],
            correct_after=None if oracle.correct_after is None else oracle.correct_after[rows],
        )
    else:
        oracle = ablation_oracle(model, dataset, num_groups, ranked, mode, objective=objective, batch_size=batch_size,
                                 max_rows=max_rows)
    seconds["oracle"] = time.perf_counter() - started
    value = utility(oracle.drop, target, majority, float(penalty))
    order = torch.sort(value, descending=True, stable=True).indices[: min(k, len(ranked))]
    return VerifiedLocalization(target, majority, [ranked[int(i)] for i in order], ranked, value, oracle,
                                float(penalty), seconds)


def iterative_localize(
    model: nn.Module,
    dataset,
    num_groups: int,
    target: int,
    k: int = 3,
    *,
    score: str = "flip_rate",
    majority: Optional[Sequence[int]] = None,
    objective: str = "margin",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    batch_size: int = 256,
) -> List[Unit]:
    """Greedy: take the best unit by a first-order score, zero it, recompute the score, repeat.

    Each step is one :func:`~spurfast.ablation_scores` pass with the units chosen so far zeroed
    (restored bit-exactly afterwards); a unit already chosen is never taken again.
    """
    _check_num_groups(num_groups)
    target = _check_group(target, num_groups, "target")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    chosen: List[Unit] = []
    for _ in range(k):
        with intervene(model, chosen, "zero") if chosen else contextlib.nullcontext():
            values = fast_score(model, dataset, num_groups, target, majority, score, objective, batch_size=batch_size)
        masked = {n: t.clone() for n, t in values.items()}
        for u in chosen:
            masked[u.layer][u.channel] = -float("inf")
        ranked = localize(NeuronScores(masked, values.kind, values.classifier), k=len(chosen) + 1, exclude=exclude)
        chosen.append(next(u for u in ranked if u not in chosen))
    return chosen


@dataclasses.dataclass
class MemorizedExamples:
    """The samples one unit holds: ``flagged`` first-order, ``exact`` measured, ``confirmed`` both.

    Index tensors into the dataset (ascending). ``precision`` = |confirmed| / |flagged| (NaN if
    nothing is flagged), ``recall`` = |confirmed| / |exact| (NaN if nothing flips).
    """

    unit: Unit
    flagged: torch.Tensor
    exact: torch.Tensor
    confirmed: torch.Tensor
    precision: float
    recall: float
    exact_groups: List[int]

    def to_dict(self) -> Dict[str, object]:
        return {
            "unit": f"{self.unit.layer}:{self.unit.channel}",
            "flagged": self.flagged.tolist(), "exact": self.exact.tolist(), "confirmed": self.confirmed.tolist(),
            "precision": self.precision, "recall": self.recall, "exact_groups": self.exact_groups,
        }


def memorized_examples(
    model: nn.Module,
    dataset,
    units: Sequence[Tuple[str, int]],
    num_groups: Optional[int] = None,
    *,
    batch_size: int = 256,
    max_rows: int = 2048,
) -> List[MemorizedExamples]:
    """For each unit, the samples whose prediction flips when it is zeroed: first-order, then exact.

    First order: samples classified correctly whose margin plus the unit's ``last_ablation``
    falls below 0. Exact: the oracle removes the unit and reads every sample (one forward of
    the dataset per unit), which gives the recall of the first-order list as well as its
    precision. ``exact_groups[g]`` counts the exact flips in group g.
    """
    units = _as_units(units)
    if not units:
        raise ValueError("units must not be empty")
    _, _, g = as_tensors(dataset, "dataset")
    if num_groups is None:
        num_groups = 1 + int(g.max()) if g.numel() else 1
    first = first_order_effects(model, dataset, units, "margin", batch_size=batch_size)
    exact = ablation_oracle(model, dataset, num_groups, units, "zero", per_sample=True, batch_size=batch_size,
                            max_rows=max_rows)
    out = []
    for j, u in enumerate(units):
        flagged = first.predicted_flip[:, j].nonzero().squeeze(1)
        flips = exact.flipped(u)
        confirmed = flagged[torch.isin(flagged, flips)]
        precision = len(confirmed) / len(flagged) if len(flagged) else float("nan")
        recall = len(confirmed) / len(flips) if len(flips) else float("nan")
        groups = torch.bincount(g[flips], minlength=num_groups).tolist() if len(flips) else [0] * num_groups
        out.append(MemorizedExamples(u, flagged, flips, confirmed, precision, recall, groups))
    return out
