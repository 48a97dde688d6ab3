"""Where a rare spurious pattern sits: the units that carry its push toward the target class.

* :func:`pattern_units` -- one :class:`~spurfast.NeuronStats` pass over images of other classes
  and their patterned copies, recording per sample the target class's probability (or its
  log-probability, or its margin); per unit, the first-order drop of that objective when the
  unit's weight row is zeroed, on the patterned copies minus on the clean images: the
  first-order change of the mean rise ``p_t(x + p) - p_t(x)`` that the spurious score
  thresholds. Units that the target class itself needs drop both alike and score near zero;
  units that read the pattern score high.
* :func:`zero_units_effect` -- the exact check: zero the top-k units and measure the spurious
  score and the clean test accuracy, against as many random units of the same layers.
* :data:`PATTERN_OBJECTIVES` -- the per-sample objectives :func:`pattern_units` can record.

Both run the model in eval mode and leave it as they found it: weights, ``.grad`` and every
module's train/eval flag, also after an exception.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.attribution.interventions import _resolve_units, intervene
from spurfast.attribution.localize import rank_all
from spurfast.attribution.scores import (
    DEFAULT_EXCLUDE,
    NeuronScores,
    Unit,
    _as_units,
    _batches,
    _check_batch_size,
    _clear_grads,
    _model_device,
    classifier_name,
    predict_logits,
    scoring_state,
)
from spurfast.capture import NeuronStats
from spurfast.rare.patterns import make_pattern, spurious_score

__all__ = ["PATTERN_OBJECTIVES", "pattern_units", "zero_units_effect"]

#: ``"log_prob"``: ``log p_target(x)``; ``"prob"``: ``p_target(x)``; ``"margin"``: the target logit
#: minus the largest other.
PATTERN_OBJECTIVES = ("log_prob", "prob", "margin")


def _target_objective(logits: torch.Tensor, target_class: int, objective: str) -> torch.Tensor:
    """``[B]`` per-sample objective toward ``target_class``."""
    if objective == "log_prob":
        return F.log_softmax(logits.float(), dim=1)[:, target_class]
    if objective == "prob":
        return F.softmax(logits.float(), dim=1)[:, target_class]
    others = logits.float().clone()
    others[:, target_class] = float("-inf")
    return logits[:, target_class].float() - others.max(1).values


def _check_images_labels(images, labels, images_arg: str, labels_arg: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{images_arg} must be a float tensor [N, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(f"{labels_arg} must be an integer tensor [N] = [{images.shape[0]}], got "
                         f"{list(getattr(labels, 'shape', []))}")


def _check_target(target_class) -> int:
    if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
        raise ValueError(f"target_class must be a non-negative int, got {target_class!r}")
    return target_class


def pattern_units(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_class: int,
    pattern,
    *,
    seed: int = 0,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
    objective: str = "prob",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> NeuronScores:
    """Per-unit score of how much of the pattern's push toward ``target_class`` each unit carries.

    On the images ``x`` not of ``target_class`` and their patterned copies ``x + p``, one
    forward and backward of ``sum_n f_n`` per batch (``f`` = ``objective``, see
    :data:`PATTERN_OBJECTIVES`) records :class:`~spurfast.NeuronStats`' first-order ablation
    statistic, the change of ``f_n`` when weight row c is zeroed (bias kept). The score of a unit
    is ``mean_x [drop of f on x + p] - mean_x [drop of f on x]``: large when zeroing it removes
    the target preference the pattern adds, not the one the images already have. The default
    ``"prob"`` is what the spurious score reads, and ranked best in a pilot (Fashion-MNIST, MLP
    and SmallCNN, S1/S3/R3); but its slope vanishes where ``p_t(x + p)`` is near 1, so a unit
    that alone drives the target to certainty is understated: ``"margin"`` (logits, no
    saturation) finds it. With ``"log_prob"`` the clean images, where ``p_t`` is small and its
    log steep, dominate, and the top units are those that hold the target down everywhere
    (zeroing them raised the spurious score in that pilot).

    ``pattern``: a name in :data:`spurfast.rare.PATTERNS`, a :class:`~spurfast.rare.Pattern` or a
    tensor (see :func:`spurfast.rare.make_pattern`; ``seed`` fixes R1-R3's noise). ``layers``:
    the layers scored (default every tracked Linear/Conv). Returns :class:`NeuronScores` ``[C]``
    float64 per layer (kind ``"pattern_units"``) with ``extra``: ``ranked`` (every unit outside
    ``exclude`` as ``Unit(layer, channel)``, best first; by default the classifier is left out,
    as in :func:`spurfast.attribution.localize`), ``ranked_scores``, ``clean_drop`` and
    ``patterned_drop`` (``{layer: [C]}``, the two means), ``n_images``, ``objective``.

    Example::

        >>> import torch, torch.nn as nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(30, 1, 4, 4) * 0.5, torch.arange(30) % 3
        >>> scores = pattern_units(model, x, y, target_class=0, pattern="S1")
        >>> scores["1"].shape, scores.extra["n_images"], scores.extra["ranked"][0].layer
        (torch.Size([6]), 20, '1')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_images_labels(images, labels, "images", "labels")
    target_class = _check_target(target_class)
    _check_batch_size(batch_size)
    if objective not in PATTERN_OBJECTIVES:
        raise ValueError(f"objective must be one of {PATTERN_OBJECTIVES}, got {objective!r}")
    pattern = make_pattern(pattern, seed=seed)
    others = images[(labels != target_class).to(images.device)]  # [M, C, H, W]
    if others.shape[0] == 0:
        raise ValueError(f"images: none outside target_class {target_class}")
    pattern.apply(others[:1])  # a size or channel mismatch fails before the model is touched
    device = _model_device(model)
    params = list(model.parameters())
    with scoring_state(model):
        stats = NeuronStats(model, 2, loss_reduction="sum", backend=backend, layers=layers,
                            track_group_grad=False, track_activations=False, track_ablation=True)
        try:
            for s in _batches(others.shape[0], batch_size):
                clean = others[s].to(device)
                both = torch.cat([clean, pattern.apply(clean)])  # [2b, C, H, W]: clean, then patterned
                ids = torch.arange(2, device=device).repeat_interleave(clean.shape[0])  # [2b] 0 = clean
                with stats.record(ids):
                    logits = model(both)
                    if logits.dim() != 2 or not target_class < logits.shape[1]:
                        raise ValueError(f"target_class {target_class} is out of range for a model whose output "
                                         f"has shape {list(logits.shape)}")
                    _target_objective(logits, target_class, objective).sum().backward()
                _clear_grads(params)
            change = {n: t.cpu() for n, t in stats.ablation_mean().items()}  # [2, C] float64: mean change of f
        finally:
            stats.remove()
    clean_drop = {n: -t[0] for n, t in change.items()}
    patterned_drop = {n: -t[1] for n, t in change.items()}
    values = {n: patterned_drop[n] - clean_drop[n] for n in change}
    scores = NeuronScores(values, "pattern_units", classifier_name(model, layers))
    ranked = rank_all(scores, exclude=exclude)
    scores.extra.update(
        ranked=ranked, ranked_scores=[float(values[u.layer][u.channel]) for u in ranked],
        clean_drop=clean_drop, patterned_drop=patterned_drop, n_images=int(others.shape[0]), objective=objective,
    )
    return scores


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    logits = predict_logits(model, images, batch_size)  # [N, K] on CPU
    return float((logits.argmax(1) == labels.cpu()).double().mean())


def _ranked_units(units, exclude) -> List[Unit]:
    if isinstance(units, NeuronScores):
        ranked = units.extra.get("ranked")
        return list(ranked) if ranked is not None else rank_all(units, exclude=exclude)
    return _as_units(units)


def _random_like(model: nn.Module, units: List[Unit], generator: torch.Generator, avoid: List[Unit]) -> List[Unit]:
    """As many random units per layer as ``units`` has there, outside ``avoid`` when the layer has
    enough others, else outside ``units``, else any (a small layer can hold most of a top-k)."""
    per_layer = _resolve_units(model, units)
    sizes = {n: m.weight.shape[0] for n, m in model.named_modules() if n in per_layer}
    out: List[Unit] = []
    for layer, channels in per_layer.items():
        for banned in (avoid, units, ()):
            pool = sorted(set(range(sizes[layer])) - {u.channel for u in banned if u.layer == layer})
            if len(pool) >= len(channels):
                break
        pick = torch.randperm(len(pool), generator=generator)[: len(channels)]
        out += [Unit(layer, pool[int(i)]) for i in pick.sort().values]
    return out


def _check_ks(ks, available: int) -> Tuple[int, ...]:
    if isinstance(ks, int) or not ks:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks must hold positive ints, got {k!r}")
        if k > available:
            raise ValueError(f"ks: k={k} exceeds the {available} ranked units")
        out.append(k)
    return tuple(sorted(set(out)))


def zero_units_effect(
    model: nn.Module,
    units: Union[NeuronScores, Sequence[Tuple[str, int]]],
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    target_class: int,
    pattern,
    *,
    seed: int = 0,
    ks: Sequence[int] = (1, 2, 4, 8),
    random_repeats: int = 5,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    threshold: float = 0.1,
    batch_size: int = 512,
    random_seed: int = 0,
) -> Dict[str, Any]:
    """The spurious score and clean accuracy with the top-k units zeroed, against random units.

    ``units``: ``(layer, channel)`` pairs best first, or a :func:`pattern_units` result (its
    ``extra["ranked"]``; another :class:`NeuronScores` is ranked outside ``exclude``). For each
    k in ``ks``, the first k units are zeroed (weight rows, :func:`spurfast.attribution.intervene`)
    and :func:`spurfast.rare.spurious_score` (``pattern``, ``seed``, ``threshold``) and the
    accuracy on all of ``test_images`` are measured; then ``random_repeats`` times as many
    random units per layer as the top k have there, and the means. Random units are drawn by a
    generator seeded with ``random_seed`` outside the top ``max(ks)`` (outside the top k, or
    anywhere in the layer, where a small layer has too few others). The weights are restored
    after each measurement.

    Returns ``{"before": {"spurious_score", "clean_acc"}, "rows": [{"k", "units",
    "spurious_score", "clean_acc", "random_spurious_score", "random_spurious_score_std",
    "random_clean_acc"}]}`` (fractions in [0, 1]; std over repeats, population).

    Example::

        >>> import torch, torch.nn as nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(30, 1, 4, 4), torch.arange(30) % 3
        >>> out = zero_units_effect(model, [("1", 2), ("1", 0)], x, y, 0, "S1", ks=(1, 2), random_repeats=2)
        >>> [r["k"] for r in out["rows"]], sorted(out["before"])
        ([1, 2], ['clean_acc', 'spurious_score'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_images_labels(test_images, test_labels, "test_images", "test_labels")
    target_class = _check_target(target_class)
    ranked = _ranked_units(units, exclude)
    if not ranked:
        raise ValueError("units must not be empty")
    _resolve_units(model, ranked)  # unknown layers and channels out of range fail here
    ks = _check_ks(ks, len(ranked))
    if isinstance(random_repeats, bool) or not isinstance(random_repeats, int) or random_repeats < 0:
        raise ValueError(f"random_repeats must be an int >= 0, got {random_repeats!r}")
    _check_batch_size(batch_size)
    pattern = make_pattern(pattern, seed=seed)
    generator = torch.Generator().manual_seed(int(random_seed))
    avoid = ranked[: max(ks)]

    def measure() -> Tuple[float, float]:
        score = spurious_score(model, test_images, test_labels, target_class, pattern, seed=seed,
                               threshold=threshold, batch_size=batch_size)
        return score, _accuracy(model, test_images, test_labels, batch_size)

    rows = []
    with scoring_state(model):
        score0, acc0 = measure()
        for k in ks:
            with intervene(model, ranked[:k], "zero"):
                score, acc = measure()
            random_scores, random_accs = [], []
            for _ in range(random_repeats):
                control = _random_like(model, ranked[:k], generator, avoid)
                with intervene(model, control, "zero"):
                    s, a = measure()
                random_scores.append(s)
                random_accs.append(a)
            rows.append({
                "k": k, "units": [[u.layer, u.channel] for u in ranked[:k]], "spurious_score": score,
                "clean_acc": acc,
                "random_spurious_score": statistics.fmean(random_scores) if random_scores else math.nan,
                "random_spurious_score_std": statistics.pstdev(random_scores) if random_scores else math.nan,
                "random_clean_acc": statistics.fmean(random_accs) if random_accs else math.nan,
            })
    return {"before": {"spurious_score": score0, "clean_acc": acc0}, "rows": rows}
