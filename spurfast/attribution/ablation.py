"""First-order ablation scores: what removing each neuron would do to each group, from one pass.

:class:`~spurfast.NeuronStats` records, in the backward of an objective ``sum_n f_n``, the
first-order change of every sample's ``f_n`` when weight row c is zeroed (bias kept),
``last_ablation[n, c] = -<d f_n / d W[c], W[c]>``. With the margin as ``f`` (true-class
logit minus the largest other; see :func:`spurfast.margin`), ``margin[n] + last_ablation[n, c]``
predicts sample n's margin with the neuron removed, so a sample whose prediction would flip
is visible before anything is removed. :func:`ablation_scores` turns one pass over a dataset
into per-group scores; :func:`first_order_effects` keeps the per-sample effects of chosen units.

Like every data score here, the pass runs the model in eval mode and leaves it as found.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from spurfast.attribution.interventions import _resolve_units
from spurfast.attribution.objectives import check_objective, per_sample_objective
from spurfast.attribution.scores import (
    NeuronScores,
    Unit,
    _as_units,
    _batches,
    _check_batch_size,
    _check_group,
    _check_num_groups,
    _clear_grads,
    _model_device,
    as_tensors,
    classifier_name,
    scoring_state,
)
from spurfast.capture import NeuronStats

#: For the loss objective a sample counts as flipped when its true-class probability would fall
#: below 1/2 (loss above log 2): exactly a flip for two classes, necessary for one with more.
LOSS_FLIP_THRESHOLD = math.log(2.0)
CONTRAST_OF = ("flip_rate", "harm")


class AblationScores(NamedTuple):
    """Per-group first-order ablation scores, all ``[G, C]`` float64 per layer (NaN for empty groups).

    * ``effect``: mean over the group's samples of the first-order change of the objective
      when the neuron's weight row is zeroed (margin: negative means the margin shrinks).
    * ``harm``: the same oriented so that larger is worse: ``-effect`` for the margin,
      ``effect`` for the loss.
    * ``flip_rate``: fraction of the group's samples that are classified correctly now and
      predicted to be misclassified with the neuron removed (margin: ``margin + effect < 0``;
      loss: ``loss + effect > log 2``).
    * ``count``: ``[G]`` samples per group; ``objective``: ``"margin"`` or ``"loss"``.
    """

    effect: NeuronScores
    harm: NeuronScores
    flip_rate: NeuronScores
    count: torch.Tensor
    objective: str

    def contrast(self, target: int, majority: Optional[Sequence[int]] = None, of: str = "flip_rate") -> NeuronScores:
        """Target-vs-majority contrast ``[C]``: ``of[target] - max over majority groups of of[m]``.

        ``of``: ``"flip_rate"`` (in accuracy units, like the exact oracle's drops) or ``"harm"``.
        ``majority`` defaults to every other non-empty group.
        """
        if of not in CONTRAST_OF:
            raise ValueError(f"of must be one of {CONTRAST_OF}, got {of!r}")
        num_groups = self.count.shape[0]
        target = _check_group(target, num_groups, "target")
        if majority is None:
            majority = [g for g in range(num_groups) if g != target and int(self.count[g]) > 0]
        majority = [_check_group(m, num_groups, "majority") for m in majority]
        if not majority or target in majority:
            raise ValueError(f"majority must be non-empty and exclude the target {target}, got {majority}")
        for group in [target] + majority:
            if int(self.count[group]) == 0:
                raise ValueError(f"group {group} has no samples in the scored data")
        base = self.flip_rate if of == "flip_rate" else self.harm
        values = {n: t[target] - t[majority].max(0).values for n, t in base.items()}
        return NeuronScores(values, f"ablation_{self.objective}_{of}_contrast", base.classifier,
                            {"target": target, "majority": majority})


def _ablation_pass(model: nn.Module, dataset, num_groups: int, objective: str, batch_size: int, backend: str,
                   layers, keep: Sequence[Unit] = (), flip_scale: float = 1.0):
    """One scoring pass: per-group sums, flip counts and the per-sample effects of ``keep``."""
    x, y, g = as_tensors(dataset, "dataset", num_groups)
    device = _model_device(model)
    params = list(model.parameters())
    with scoring_state(model):
        stats = NeuronStats(model, num_groups, loss_reduction="sum", backend=backend, layers=layers,
                            track_group_grad=False, track_activations=False)
        try:
            names = stats.layer_names
            unknown = [u for u in keep if u.layer not in names]
            if unknown:
                raise ValueError(f"units: layers {sorted({u.layer for u in unknown})} are not tracked; tracked: {names}")
            flips = {n: torch.zeros_like(t) for n, t in stats.ablation_sum.items()}  # [G, C] float64
            kept: List[torch.Tensor] = []
            values: List[torch.Tensor] = []
            correct: List[torch.Tensor] = []
            for s in _batches(x.shape[0], batch_size):
                ids = g[s].to(device)
                labels = y[s].to(device)
                with stats.record(ids):
                    logits = model(x[s].to(device))
                    value = per_sample_objective(logits, labels, objective)  # [b]
                    value.sum().backward()
                _clear_grads(params)
                value = value.detach()
                right = logits.detach().argmax(1) == labels
                for n, effect in stats.last_ablation.items():
                    after = value.unsqueeze(1) + flip_scale * effect.to(value.dtype)
                    wrong_after = after < 0 if objective == "margin" else after > LOSS_FLIP_THRESHOLD
                    flips[n].index_add_(0, ids.to(effect.device), (right.unsqueeze(1) & wrong_after).double())
                if keep:
                    kept.append(torch.stack([stats.last_ablation[u.layer][:, u.channel] for u in keep], 1).cpu())
                values.append(value.float().cpu())
                correct.append(right.cpu())
            count = stats.group_count.clone()
            mean = {n: t.cpu() for n, t in stats.ablation_mean().items()}
            denom = count.double().unsqueeze(1)
            flip_rate = {n: torch.where(denom > 0, flips[n].cpu() / denom.clamp(min=1), math.nan) for n in names}
        finally:
            stats.remove()
    per_sample = torch.cat(kept) if kept else None
    return names, count, mean, flip_rate, per_sample, torch.cat(values), torch.cat(correct), g


def ablation_scores(
    model: nn.Module,
    dataset,
    num_groups: int,
    objective: str = "margin",
    *,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
    flip_scale: float = 1.0,
) -> AblationScores:
    """First-order ablation scores ``[G, C]`` of every tracked neuron from one pass over ``dataset``.

    One forward and one backward of ``sum_n f_n`` per batch (``f`` the margin or the
    cross-entropy), during which :class:`~spurfast.NeuronStats` records each sample's first-order
    effect of zeroing each weight row; the batch is then reduced per group. No extra pass and no
    GEMM beyond an ordinary backward.

    ``flip_scale``: the factor applied to the effect when predicting flips (``margin +
    flip_scale * effect < 0``); the linear estimate tends to understate what removing a whole
    row does, and a factor above 1 leans against that. It changes ``flip_rate`` only.

    Example::

        >>> import torch, torch.nn as nn, spurfast as sf
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> scores = sf.ablation_scores(model, data, num_groups=4)
        >>> scores.harm["0"].shape, scores.contrast(target=1)["0"].shape
        (torch.Size([4, 8]), torch.Size([8]))
    """
    _check_num_groups(num_groups)
    check_objective(objective)
    _check_batch_size(batch_size)
    if isinstance(flip_scale, bool) or not isinstance(flip_scale, (int, float)) or not flip_scale > 0:
        raise ValueError(f"flip_scale must be a number > 0, got {flip_scale!r}")
    names, count, mean, flip_rate, _, _, _, _ = _ablation_pass(model, dataset, num_groups, objective, batch_size,
                                                               backend, layers, flip_scale=float(flip_scale))
    mean = {n: torch.where(count.unsqueeze(1) > 0, mean[n], math.nan) for n in names}
    harm = {n: -t if objective == "margin" else t.clone() for n, t in mean.items()}
    classifier = classifier_name(model, layers)
    return AblationScores(
        NeuronScores(mean, f"ablation_{objective}_effect", classifier),
        NeuronScores(harm, f"ablation_{objective}_harm", classifier),
        NeuronScores(flip_rate, f"ablation_{objective}_flip_rate", classifier),
        count,
        objective,
    )


class FirstOrderEffects(NamedTuple):
    """Per-sample first-order effects of chosen units, from one pass.

    ``units``; ``effect [N, U]`` float32 (change of the objective); ``value [N]`` the objective
    now; ``correct [N]`` bool; ``predicted_flip [N, U]`` bool: correct now and predicted wrong
    with the unit removed; ``group_ids [N]``.
    """

    units: List[Unit]
    effect: torch.Tensor
    value: torch.Tensor
    correct: torch.Tensor
    predicted_flip: torch.Tensor
    group_ids: torch.Tensor
    objective: str


def first_order_effects(
    model: nn.Module,
    dataset,
    units: Sequence[Tuple[str, int]],
    objective: str = "margin",
    *,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
) -> FirstOrderEffects:
    """Each sample's first-order change of the objective when each of ``units`` is zeroed alone.

    ``layers`` defaults to the layers of ``units`` (only those are recorded).
    """
    check_objective(objective)
    _check_batch_size(batch_size)
    units = _as_units(units)
    if not units:
        raise ValueError("units must not be empty")
    _resolve_units(model, units)  # names and channel ranges, before anything runs
    if layers is None:
        layers = list(dict.fromkeys(u.layer for u in units))
    _, _, group_ids = as_tensors(dataset, "dataset")
    num_groups = 1 + int(group_ids.max()) if group_ids.numel() else 1
    _, _, _, _, effect, value, correct, g = _ablation_pass(model, dataset, num_groups, objective, batch_size, backend,
                                                           layers, keep=units)
    after = value.unsqueeze(1) + effect
    wrong_after = after < 0 if objective == "margin" else after > LOSS_FLIP_THRESHOLD
    return FirstOrderEffects(units, effect, value, correct, correct.unsqueeze(1) & wrong_after, g, objective)
