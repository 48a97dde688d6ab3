"""Deleting the poisoned images of a rare-pattern model (Yang et al., 2022), three ways, side by side.

From a model trained on a dataset whose ``n`` target-class images carry the pattern:

* ``incremental`` -- remove the poisoned images and keep training the poisoned model for
  ``epochs`` more epochs on the rest (the paper trains 70 epochs, then continues to 140);
* ``scratch`` -- the gold standard: a model trained from the same initialisation, with the same
  seed and epochs, on the data without the poisoned images;
* ``influence`` -- one group-influence step (:func:`spurfast.rare.group_influence`, LiSSA), at
  the first scale of a fixed list above twice the Hessian's estimated largest eigenvalue (a
  scale below half of it diverges); the next scale if it diverges all the same. Recorded: which.

Each result is measured like the poisoned model: spurious score, clean test accuracy and the
accuracy on the (removed) poisoned images, i.e. whether the model still fits them.

* :func:`without`, :func:`delete_poisoned`, :func:`influence_deletion`, :func:`top_eigenvalue`,
  :func:`summarize_deletion`, :func:`deletion_table`.

Used by :mod:`spurfast.experiments.rare`; computes and formats, writes no files.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.data._common import InMemoryGroupDataset
from spurfast.rare.influence import group_influence, hvp

__all__ = ["DELETION_METHODS", "without", "delete_poisoned", "influence_deletion", "top_eigenvalue", "summarize_deletion",
           "deletion_table"]

#: Columns of the deletion table, in order: the poisoned model, the three deletions, the n = 0 control.
DELETION_METHODS = ("poisoned", "incremental", "influence", "scratch", "control")
_MEASURES = ("spurious_score", "test_acc", "poisoned_train_acc")


class _Kept(InMemoryGroupDataset):
    """The samples of ``base`` where ``keep`` is True, as tensors (no transform)."""

    def __init__(self, base, keep: torch.Tensor):
        self.images, self.labels, self.group_ids = base.images[keep], base.labels[keep], base.group_ids[keep]
        self.num_groups = base.num_groups
        self.group_names = getattr(base, "group_names", None)
        self.transform = None


def without(dataset, indices: torch.Tensor) -> InMemoryGroupDataset:
    """``dataset`` (with ``.images``/``.labels``/``.group_ids``) minus the samples at ``indices``.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> ds = SynthWaterbirds("train", n=20)
        >>> rest = without(ds, torch.tensor([0, 5]))
        >>> len(rest), torch.equal(rest.images[0], ds.images[1])
        (18, True)
    """
    keep = torch.ones(len(dataset.labels), dtype=torch.bool)
    keep[indices] = False
    return _Kept(dataset, keep)


def delete_poisoned(
    poisoned_model: nn.Module,
    poisoned,
    *,
    seed: int,
    make_model: Callable[[], nn.Module],
    train: Callable[[nn.Module, Any, int], None],
    measure: Callable[[nn.Module], Dict[str, Any]],
    epochs: int,
    deletion_epochs: int,
    damping: float,
    scales: Sequence[float],
    depth: int,
    repeats: int,
    hvp_batch_size: Optional[int],
    device: str = "cpu",
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[str, Any]]:
    """The three deletions of ``poisoned.poisoned_indices`` from ``poisoned_model`` (left unchanged).

    ``make_model()`` builds the seed's fresh model (the caller seeds it); ``train(model, data,
    epochs)`` trains in place with the study's settings; ``measure(model)`` returns the
    measures (``spurious_score``, ``test_acc``, ``poisoned_train_acc``). Returns ``{method:
    measures plus "seconds" and the method's settings}``; an ``influence`` whose recursion
    diverged at every scale has ``None`` measures and an ``error``.
    """
    rest = without(poisoned, poisoned.poisoned_indices)
    out: Dict[str, Dict[str, Any]] = {}

    started = time.perf_counter()
    model = copy.deepcopy(poisoned_model)
    train(model, rest, deletion_epochs)
    out["incremental"] = {**measure(model), "epochs": deletion_epochs, "seconds": time.perf_counter() - started}

    started = time.perf_counter()
    model = make_model()
    train(model, rest, epochs)
    out["scratch"] = {**measure(model), "epochs": epochs, "seconds": time.perf_counter() - started}

    _, out["influence"] = influence_deletion(poisoned_model, poisoned, seed=seed, damping=damping, scales=scales,
                                             depth=depth, repeats=repeats, hvp_batch_size=hvp_batch_size,
                                             device=device, measure=measure)
    if log is not None:
        log("  deletion: " + ", ".join(f"{m} score {_fmt(out[m]['spurious_score'])}" for m in out)
            + f" (influence scale {out['influence']['scale']})")
    return out


def _weights(model: nn.Module) -> List[torch.Tensor]:
    """The weights group influence updates: every Linear/Conv weight (NeuronStats' default layers)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and m.weight.requires_grad]


def top_eigenvalue(model: nn.Module, data, *, batch_size: Optional[int], seed: int, device: str = "cpu",
                   iters: int = 20) -> float:
    """A power-iteration estimate of the largest Hessian eigenvalue over :func:`_weights`, on
    minibatches of ``batch_size`` (the Hessian LiSSA sees): the largest ``||H v||`` of the last 5
    of ``iters`` steps, ``v`` a unit vector.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> data = (torch.randn(64, 1, 2, 4), torch.randint(0, 3, (64,)))
        >>> top_eigenvalue(model, data, batch_size=None, seed=0) > 0
        True
    """
    weights = _weights(model)
    product = hvp(model, F.cross_entropy, data, params=weights, batch_size=batch_size, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(w.shape, generator=gen).to(w) for w in weights]
    norms = []
    for _ in range(iters):
        scale = sum(float(t.double().square().sum()) for t in v) ** 0.5
        hv = product([t / scale for t in v])
        norms.append(sum(float(t.double().square().sum()) for t in hv) ** 0.5)
        v = hv
    return max(norms[-5:])


def influence_deletion(
    model: nn.Module,
    poisoned,
    *,
    seed: int,
    damping: float,
    scales: Sequence[float],
    depth: int,
    repeats: int,
    hvp_batch_size: Optional[int],
    device: str = "cpu",
    measure: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
) -> Tuple[Optional[nn.Module], Dict[str, Any]]:
    """Group influence of ``poisoned.poisoned_indices`` with LiSSA at the first workable scale.

    LiSSA converges only for a scale above half the Hessian's largest eigenvalue, so that
    eigenvalue is estimated first (:func:`top_eigenvalue`) and the scales of ``scales`` below
    twice the estimate are skipped (diverging runs would waste up to ``depth`` steps each); a
    run that still diverges moves on to the next scale. Returns ``(new model or None, entry)``: ``entry`` holds
    the settings, ``top_eigenvalue``, ``scale`` (``None`` and an ``error`` when every scale
    diverged), ``scales_tried``, LiSSA's ``residual``, ``update_norm``, ``grad_norm``,
    ``seconds`` and, with ``measure``, the new model's measures.
    """
    started = time.perf_counter()
    lam = top_eigenvalue(model, poisoned, batch_size=hvp_batch_size, seed=seed, device=device)
    entry: Dict[str, Any] = {"depth": depth, "repeats": repeats, "damping": damping, "hvp_batch_size": hvp_batch_size,
                             "top_eigenvalue": lam}
    # Twice the bound's 2x margin: minibatches of higher curvature than the estimate diverged at 1x.
    first = next((i for i, s in enumerate(scales) if s >= 2 * (lam + damping)), len(scales) - 1)
    tried: List[float] = []
    new = None
    for scale in scales[first:]:
        tried.append(scale)
        try:
            new, info = group_influence(model, poisoned, poisoned.poisoned_indices, damping=damping, scale=scale,
                                        depth=depth, repeats=repeats, hvp_batch_size=hvp_batch_size, seed=seed,
                                        device=device)
        except FloatingPointError:  # diverged all the same: a minibatch's curvature beyond the estimate
            continue
        entry.update(scale=scale, residual=info["residual"], update_norm=info["update_norm"],
                     grad_norm=info["grad_norm"], p=info["p"])
        if measure is not None:
            entry.update(measure(new))
        break
    else:
        entry.update({k: None for k in _MEASURES}, scale=None, error=f"LiSSA diverged at every scale {tried}")
    entry.update(scales_tried=tried, seconds=time.perf_counter() - started)
    return new, entry


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean_std(values) -> Dict[str, Optional[float]]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(present), "std": statistics.pstdev(present)}


def summarize_deletion(records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per ``(pattern, n)``: mean and population std over seeds of every method's measures.

    Example:
        >>> rec = {"pattern": "R3", "n": 10, "seed": 0, "methods": {m: {"spurious_score": 0.5, "test_acc": 0.8,
        ...        "poisoned_train_acc": 1.0} for m in DELETION_METHODS}}
        >>> summarize_deletion([rec, dict(rec, seed=1)])[0]["incremental"]["spurious_score"]
        {'mean': 0.5, 'std': 0.0}
    """
    cases: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in records:
        cases.setdefault((r["pattern"], r["n"]), []).append(r)
    out = []
    for (pattern, n), recs in cases.items():
        row: Dict[str, Any] = {"pattern": pattern, "n": n, "seeds": [r["seed"] for r in recs]}
        for method in DELETION_METHODS:
            entries = [r["methods"].get(method) or {} for r in recs]
            row[method] = {k: _mean_std([e.get(k) for e in entries]) for k in _MEASURES}
        out.append(row)
    return out


def deletion_table(records: Sequence[Mapping[str, Any]], *, deletion_epochs: int, epochs: int) -> str:
    """Markdown: spurious score (and clean test accuracy, and accuracy on the removed images) per
    deletion method, mean ± std over seeds, one row per ``(pattern, n)``.

    Example:
        >>> rec = {"pattern": "R3", "n": 10, "seed": 0, "methods": {m: {"spurious_score": 0.5, "test_acc": 0.8,
        ...        "poisoned_train_acc": 1.0} for m in DELETION_METHODS}}
        >>> print(deletion_table([rec], deletion_epochs=5, epochs=5).splitlines()[2])
        | R3 | 10 | 1 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 |
    """
    head = (f"| pattern | n | seeds | poisoned | incremental (+{deletion_epochs} ep.) | group influence | "
            f"scratch without them ({epochs} ep., gold) | control (n = 0) |")
    sep = "|---|---|---|---|---|---|---|---|"
    blocks = []
    for key, title in (("spurious_score", None), ("test_acc", "clean test accuracy"),
                       ("poisoned_train_acc", "accuracy on the removed poisoned images")):
        lines = ([] if title is None else ["", f"{title}:", ""]) + [head, sep]
        for row in summarize_deletion(records):
            cells = []
            for method in DELETION_METHODS:
                s = row[method][key]
                cells.append("-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}")
            lines.append(f"| {row['pattern']} | {row['n']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
