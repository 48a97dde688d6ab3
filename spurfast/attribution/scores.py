"""Memorization scores: which neurons (and which training samples) carry a group's fit.

A *neuron* is one output row of a tracked layer's weight (``W[c]`` of an ``nn.Linear``,
``W[c, ...]`` of an ``nn.Conv1d``/``nn.Conv2d``), as in :mod:`spurfast.capture`. Every score
is a :class:`NeuronScores`: a read-only mapping ``layer name -> tensor`` in module order,
whose tensors are ``[C]`` (one score per neuron) or, for per-group scores, ``[G, C]``.

Scores computed from data run the model in **eval mode** (so BatchNorm uses its running
statistics and a sample's gradient does not depend on the batch it sits in), and leave the
model exactly as they found it: its train/eval flags, its weights and every parameter's
``.grad``.

* :func:`magnitude` -- ``||W[c]||_2``.
* :func:`group_gradient` -- the score of You et al. (2025): per group, the ``hardest``
  samples with the lowest true-class probability; ``||dL_g/dW[c]||_2`` with ``L_g`` their
  mean cross-entropy. One pass of :class:`~spurfast.NeuronStats` over the selected samples.
* :func:`group_profile` -> :func:`grad_sq_contrast`, :func:`activation_contrast` -- per-sample
  statistics: per group, the mean per-sample squared gradient norm of each neuron (and its
  variance), and the per-group activation mean/variance; contrasts minority vs majority.
* :func:`unstructured_threshold` -- boolean masks of the weights with the largest ``|w|``.
* per-sample self-influence lives in :mod:`spurfast.attribution.influence`, the top-k
  units of a score in :mod:`spurfast.attribution.localize`.
* :func:`auroc` -- rank-based area under the ROC curve, to check a per-sample score.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.capture import NeuronStats

#: Placeholder in ``exclude`` patterns standing for the final classifier layer.
CLASSIFIER = "<classifier>"
#: Layers excluded from localization by default (the paper's choice): BatchNorm (not tracked
#: anyway), downsample/shortcut convolutions and the final classifier.
DEFAULT_EXCLUDE: Tuple[str, ...] = ("bn", "downsample", "shortcut", CLASSIFIER)


class Unit(NamedTuple):
    """One neuron: output row ``channel`` of the weight of the layer called ``layer``."""

    layer: str
    channel: int


class NeuronScores(Mapping[str, torch.Tensor]):
    """Per-layer, per-neuron scores: ``scores[layer]`` is ``[C]``, or ``[G, C]`` when grouped.

    Attributes:
        kind: what the numbers are (``"magnitude"``, ``"group_gradient"``, ...).
        grouped: ``True`` when every tensor is ``[G, C]`` (row g = group g).
        classifier: name of the final classifier layer (the last tracked ``nn.Linear``), which
            :func:`localize` excludes by default; ``None`` if there is none.
        extra: anything the score computed on the way (e.g. the selected samples).

    Example::

        >>> import torch.nn as nn, spurfast.attribution as S
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> scores = S.magnitude(model)
        >>> list(scores), scores["0"].shape, scores.classifier
        (['0', '2'], torch.Size([3]), '2')
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        kind: str,
        classifier: Optional[str] = None,
        extra: Optional[Dict[str, object]] = None,
    ):
        values = OrderedDict(values)
        if not values:
            raise ValueError("values must hold at least one layer")
        dims = {t.dim() for t in values.values()}
        if len(dims) != 1 or dims.pop() not in (1, 2):
            raise ValueError("values must be all [C] or all [G, C] tensors")
        self._values = values
        self.kind = kind
        self.grouped = next(iter(values.values())).dim() == 2
        self.classifier = classifier
        self.extra = extra if extra is not None else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def layer_names(self) -> List[str]:
        return list(self._values)

    @property
    def num_groups(self) -> Optional[int]:
        return next(iter(self._values.values())).shape[0] if self.grouped else None

    def for_group(self, group: int) -> "NeuronScores":
        """The ``[C]`` scores of one group of a grouped score."""
        if not self.grouped:
            raise ValueError(f"group: {self.kind} scores are not per group")
        _check_group(group, self.num_groups, "group")
        return NeuronScores(
            {n: t[group] for n, t in self._values.items()}, f"{self.kind}[group {group}]", self.classifier, self.extra
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {list(t.shape)}" for n, t in self._values.items())
        return f"NeuronScores(kind={self.kind!r}, {{{shapes}}})"


# ---------------------------------------------------------------------- shared plumbing
def _check_group(group, num_groups: int, arg: str) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < num_groups:
        raise ValueError(f"{arg} must be an int in [0, {num_groups}), got {group!r}")
    return group


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def tracked_layers(model: nn.Module, layers=None) -> List[str]:
    """Names of the layers :class:`~spurfast.NeuronStats` tracks in ``model`` (module order)."""
    stats = NeuronStats(model, 1, layers=layers, track_group_grad=False, track_activations=False)
    names = stats.layer_names
    stats.remove()
    return names


def classifier_name(model: nn.Module, layers=None) -> Optional[str]:
    """The final classifier: the last tracked ``nn.Linear`` in module order (``None`` if none)."""
    modules = dict(model.named_modules())
    linear = [n for n in tracked_layers(model, layers) if isinstance(modules[n], nn.Linear)]
    return linear[-1] if linear else None


def as_tensors(dataset, arg: str = "dataset", num_groups: Optional[int] = None):
    """``(images [N, ...], labels [N] int64, group_ids [N] int64)`` from a dataset.

    Accepts an object with ``.images``, ``.labels`` and ``.group_ids`` tensors (e.g.
    :class:`spurfast.data.SynthWaterbirds` without a ``transform``), a ``(images, labels,
    group_ids)`` tuple, a ``DataLoader`` (its ``.dataset`` is used, in dataset order) or a
    map-style dataset whose items are ``(image, label, group_id)`` (a dataset's ``transform``
    is then applied, once per item).
    """
    if isinstance(dataset, torch.utils.data.DataLoader):
        dataset = dataset.dataset
    if all(hasattr(dataset, a) for a in ("images", "labels", "group_ids")) and getattr(dataset, "transform", None) is None:
        x, y, g = dataset.images, dataset.labels, dataset.group_ids
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 3 and all(isinstance(t, torch.Tensor) for t in dataset):
        x, y, g = dataset
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        items = [dataset[i] for i in range(len(dataset))]
        if not items or len(items[0]) != 3:
            raise ValueError(f"{arg}: items must be (image, label, group_id) triples")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        g = torch.as_tensor([int(it[2]) for it in items])
    else:
        raise TypeError(
            f"{arg} must have .images/.labels/.group_ids, be an (images, labels, group_ids) tuple, "
            f"a DataLoader or a map-style dataset of triples; got {type(dataset).__name__}"
        )
    if y.dim() != 1 or g.dim() != 1 or not (x.shape[0] == y.shape[0] == g.shape[0]):
        raise ValueError(
            f"{arg}: expected images [N, ...], labels [N], group_ids [N]; got "
            f"{list(x.shape)}, {list(y.shape)}, {list(g.shape)}"
        )
    if y.is_floating_point() or g.is_floating_point():
        raise ValueError(f"{arg}: labels and group_ids must be integer tensors")
    y, g = y.long(), g.long()
    if num_groups is not None and g.numel() and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise ValueError(f"{arg}: group ids must lie in [0, {num_groups}), got range [{int(g.min())}, {int(g.max())}]")
    return x, y, g


@contextlib.contextmanager
def scoring_state(model: nn.Module):
    """Run ``model`` in eval mode with empty ``.grad``; restore modes and ``.grad`` afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, training in modes:
            m.training = training


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits ``[N, K]`` (on CPU) of ``model`` as it is (no mode change), in batches."""
    device = _model_device(model)
    out = [model(images[s].to(device)).float().cpu() for s in _batches(images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def _clear_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` names ``name`` exactly, a parent of it, or starts one of its dotted parts."""
    return name == pattern or name.startswith(pattern + ".") or any(p.startswith(pattern) for p in name.split("."))


def _eligible(names: Sequence[str], exclude, classifier: Optional[str], arg: str) -> List[str]:
    if isinstance(exclude, str):
        raise ValueError(f"{arg} must be a sequence of patterns, not a single string")
    patterns = list(exclude or ())
    out = []
    for name in names:
        hit = False
        for pattern in patterns:
            if pattern == CLASSIFIER:
                hit = hit or name == classifier
            else:
                hit = hit or _matches(name, pattern)
        if not hit:
            out.append(name)
    return out


# ---------------------------------------------------------------------- scores
def magnitude(model: nn.Module, layers=None) -> NeuronScores:
    """``||W[c]||_2`` per neuron (bias excluded), ``[C]`` float64 per tracked layer.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as S
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        >>> S.magnitude(nn.Sequential(lin))["0"]
        tensor([5., 1.], dtype=torch.float64)
    """
    modules = dict(model.named_modules())
    names = tracked_layers(model, layers)
    values = {n: modules[n].weight.detach().flatten(1).double().norm(dim=1).cpu() for n in names}
    return NeuronScores(values, "magnitude", classifier_name(model, layers))


def group_gradient(
    model: nn.Module,
    dataset,
    num_groups: int,
    hardest: int = 200,
    *,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
) -> NeuronScores:
    """The group-gradient score ``[G, C]``: ``||dL_g / dW[c]||_2`` per group g and neuron c.

    For each group, the ``hardest`` samples with the lowest predicted probability of their
    true class are selected (all of them if the group is smaller); ``L_g`` is the mean
    cross-entropy over them. All groups are served by a single backward pass over the union
    of the selected samples: :class:`~spurfast.NeuronStats` sums ``dl_n/dW`` per group
    (``group_grad``) while the weight gradient is computed, and ``group_grad[g] / n_g`` is
    ``dL_g/dW``. A group with no samples scores 0.

    ``extra["selected"][g]`` holds the dataset indices chosen for group g (ascending) and
    ``extra["p_true"]`` ``[N]`` the true-class probabilities they were chosen by.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as S
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> scores = S.group_gradient(model, data, num_groups=4, hardest=6)
        >>> scores["0"].shape, [len(i) for i in scores.extra["selected"].values()]
        (torch.Size([4, 8]), [6, 6, 6, 6])
    """
    _check_num_groups(num_groups)
    if isinstance(hardest, bool) or not isinstance(hardest, int) or hardest < 1:
        raise ValueError(f"hardest must be a positive int, got {hardest!r}")
    _check_batch_size(batch_size)
    x, y, g = as_tensors(dataset, "dataset", num_groups)
    device = _model_device(model)
    params = list(model.parameters())
    with scoring_state(model):
        logits = predict_logits(model, x, batch_size)
        p_true = logits.softmax(-1).gather(1, y.unsqueeze(1)).squeeze(1)  # [N]
        selected: Dict[int, torch.Tensor] = {}
        for group in range(num_groups):
            members = (g == group).nonzero().squeeze(1)
            # stable sort: equal probabilities are taken in dataset order
            order = torch.sort(p_true[members], stable=True).indices[:hardest]
            selected[group] = members[order].sort().values
        chosen = torch.cat(list(selected.values())).sort().values
        stats = NeuronStats(
            model, num_groups, loss_reduction="sum", backend=backend, layers=layers, track_activations=False
        )
        try:
            for s in _batches(chosen.numel(), batch_size):
                idx = chosen[s]
                with stats.record(g[idx].to(device)):
                    F.cross_entropy(model(x[idx].to(device)), y[idx].to(device), reduction="sum").backward()
                _clear_grads(params)
            count = torch.tensor([float(selected[k].numel()) for k in range(num_groups)], dtype=torch.float64)
            values = {}
            for name, summed in stats.group_grad.items():
                mean_grad = summed.double().flatten(2) / count.clamp(min=1).to(summed.device).view(-1, 1, 1)
                values[name] = mean_grad.norm(dim=2).cpu()  # [G, C]
        finally:
            stats.remove()
    return NeuronScores(
        values, "group_gradient", classifier_name(model, layers), {"selected": selected, "p_true": p_true}
    )


class GroupProfile(NamedTuple):
    """Per-group per-sample statistics of every neuron, from one pass over a dataset.

    ``grad_sq_mean``/``grad_sq_var``: per group, mean and population variance over its samples
    of ``||dl_n/dW[c]||^2``; ``act_mean``/``act_var``: the same for the neuron's activation
    (layer output averaged over positions). All ``[G, C]`` float64 (NaN for an empty group).
    ``count``: ``[G]`` samples per group.
    """

    grad_sq_mean: NeuronScores
    grad_sq_var: NeuronScores
    act_mean: NeuronScores
    act_var: NeuronScores
    count: torch.Tensor


def group_profile(
    model: nn.Module,
    dataset,
    num_groups: int,
    *,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
) -> GroupProfile:
    """One pass of :class:`~spurfast.NeuronStats` over ``dataset``: per-group per-neuron statistics.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as S
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> profile = S.group_profile(model, data, num_groups=4)
        >>> profile.grad_sq_mean["0"].shape, profile.count.tolist()
        (torch.Size([4, 8]), [10, 10, 10, 10])
        >>> S.grad_sq_contrast(profile, minority=[1, 2])["0"].shape
        torch.Size([8])
    """
    _check_num_groups(num_groups)
    _check_batch_size(batch_size)
    x, y, g = as_tensors(dataset, "dataset", num_groups)
    device = _model_device(model)
    params = list(model.parameters())
    with scoring_state(model):
        stats = NeuronStats(
            model, num_groups, loss_reduction="sum", backend=backend, layers=layers, track_group_grad=False
        )
        try:
            sq_sum = {n: torch.zeros_like(t) for n, t in stats.grad_sq_sum.items()}  # [G, C] float64
            for s in _batches(x.shape[0], batch_size):
                ids = g[s].to(device)
                with stats.record(ids):
                    F.cross_entropy(model(x[s].to(device)), y[s].to(device), reduction="sum").backward()
                _clear_grads(params)
                for n, grad_sq in stats.last_grad_sq.items():
                    sq_sum[n].index_add_(0, ids.to(grad_sq.device), grad_sq.double().square())
            count = stats.group_count.clone()
            mean = {n: t.cpu() for n, t in stats.grad_sq_mean().items()}
            denom = count.double().unsqueeze(1)
            var = {n: (sq_sum[n].cpu() / denom - mean[n].square()).clamp(min=0) for n in mean}
            act_mean = {n: torch.where(denom > 0, t.cpu(), math.nan) for n, t in stats.act_mean.items()}
            act_var = {n: torch.where(denom > 0, t.cpu(), math.nan) for n, t in stats.act_var.items()}
        finally:
            stats.remove()
    classifier = classifier_name(model, layers)
    return GroupProfile(
        NeuronScores(mean, "grad_sq_mean", classifier),
        NeuronScores(var, "grad_sq_var", classifier),
        NeuronScores(act_mean, "act_mean", classifier),
        NeuronScores(act_var, "act_var", classifier),
        count,
    )


CONTRASTS = ("standardized", "difference", "log_ratio")


def _pool(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, groups: List[int]):
    """Mean and variance ``[C]`` of the union of ``groups`` (law of total variance)."""
    w = count[groups].double()
    m, v = mean[groups], var[groups]
    total = w.sum()
    pooled_mean = (w.unsqueeze(1) * m).sum(0) / total
    pooled_var = (w.unsqueeze(1) * (v + (m - pooled_mean).square())).sum(0) / total
    return pooled_mean, pooled_var


def _contrast(mean: NeuronScores, var: NeuronScores, count, minority, majority, kind, kind_name, eps):
    if kind not in CONTRASTS:
        raise ValueError(f"kind must be one of {CONTRASTS}, got {kind!r}")
    num_groups = count.shape[0]
    if isinstance(minority, int):
        minority = [minority]
    minority = [_check_group(m, num_groups, "minority") for m in minority]
    if majority is None:
        majority = [k for k in range(num_groups) if k not in minority]
    elif isinstance(majority, int):
        majority = [majority]
    majority = [_check_group(m, num_groups, "majority") for m in majority]
    if not minority or not majority or set(minority) & set(majority):
        raise ValueError(f"minority {minority} and majority {majority} must be non-empty and disjoint")
    for arg, groups in (("minority", minority), ("majority", majority)):
        if int(count[groups].sum()) == 0:
            raise ValueError(f"{arg}: groups {groups} have no recorded samples")
    values = {}
    for name in mean:
        m_min, v_min = _pool(mean[name], var[name], count, minority)
        m_maj, v_maj = _pool(mean[name], var[name], count, majority)
        if kind == "difference":
            values[name] = m_min - m_maj
        elif kind == "log_ratio":
            values[name] = torch.log((m_min + eps) / (m_maj + eps))
        else:
            values[name] = (m_min - m_maj) / torch.sqrt((v_min + v_maj) / 2 + eps)
    return NeuronScores(values, f"{kind_name}_{kind}", mean.classifier, {"minority": minority, "majority": majority})


def grad_sq_contrast(
    profile: GroupProfile, minority, majority=None, kind: str = "standardized", eps: float = 1e-12
) -> NeuronScores:
    """Minority-vs-majority contrast ``[C]`` of the per-sample squared gradient norm.

    ``minority``/``majority``: a group or list of groups (``majority`` defaults to all the
    others); groups are pooled weighting by their sample counts. ``kind``:
    ``"standardized"`` ``(m_min - m_maj) / sqrt((v_min + v_maj) / 2)`` (a per-neuron effect
    size), ``"difference"`` ``m_min - m_maj`` or ``"log_ratio"`` ``log(m_min / m_maj)``.
    """
    return _contrast(profile.grad_sq_mean, profile.grad_sq_var, profile.count, minority, majority, kind, "grad_sq", eps)


def activation_contrast(
    profile: GroupProfile, minority, majority=None, kind: str = "standardized", eps: float = 1e-12
) -> NeuronScores:
    """Minority-vs-majority contrast ``[C]`` of the mean activation; see :func:`grad_sq_contrast`.

    Activations can be negative, so ``kind="log_ratio"`` is refused.
    """
    if kind == "log_ratio":
        raise ValueError("kind='log_ratio' is not defined for activations (they can be negative)")
    return _contrast(profile.act_mean, profile.act_var, profile.count, minority, majority, kind, "act", eps)


def unstructured_threshold(
    model: nn.Module,
    top_percent: float,
    subsample: Optional[float] = None,
    *,
    seed: int = 0,
    layers=None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> Dict[str, torch.Tensor]:
    """Masks of the weights with ``|w|`` at or above the global top-``top_percent``% quantile.

    The quantile is taken over the weights of the eligible layers (tracked layers minus
    ``exclude``, as in :func:`localize`); ties at the threshold are all kept. With
    ``subsample=p`` each selected weight is kept with probability p (seeded, drawn on CPU).
    Returns ``{layer name: bool tensor shaped like its weight}`` for :func:`spurfast.attribution.intervene`.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as S
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> masks = S.unstructured_threshold(model, top_percent=5.0)
        >>> list(masks), int(masks["0"].sum())
        (['0'], 5)
    """
    if isinstance(top_percent, bool) or not isinstance(top_percent, (int, float)) or not 0 < top_percent <= 100:
        raise ValueError(f"top_percent must be a number in (0, 100], got {top_percent!r}")
    if subsample is not None and not (isinstance(subsample, (int, float)) and 0 < subsample <= 1):
        raise ValueError(f"subsample must be None or a probability in (0, 1], got {subsample!r}")
    modules = dict(model.named_modules())
    names = _eligible(tracked_layers(model, layers), exclude, classifier_name(model, layers), "exclude")
    if not names:
        raise ValueError("exclude removes every tracked layer; nothing to threshold")
    weights = [modules[n].weight.detach() for n in names]
    flat = torch.cat([w.abs().flatten().float().cpu() for w in weights])
    keep = max(1, math.ceil(flat.numel() * top_percent / 100.0))
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w in zip(names, weights):
        mask = w.abs().float().cpu() >= threshold
        if subsample is not None:
            mask &= torch.rand(mask.shape, generator=generator) < subsample
        masks[name] = mask.to(w.device)
    return masks


def _as_units(units, arg: str = "units") -> List[Unit]:
    try:
        out = [Unit(str(layer), int(channel)) for layer, channel in units]
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a sequence of (layer_name, channel) pairs") from None
    return out


# ---------------------------------------------------------------------- evaluation helpers
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks ``[N]`` float64 of ``values`` ``[N]``, tied values sharing their mean rank."""
    values = torch.as_tensor(values).double().flatten()
    order = torch.argsort(values)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(values)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for the boolean labels ``positive`` ``[N]``.

    Mann-Whitney form: the probability that a random positive outscores a random negative,
    ties counting one half (average ranks).

    Example::

        >>> import torch, spurfast.attribution as S
        >>> S.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True]))
        0.75
    """
    scores = torch.as_tensor(scores).double().flatten()
    positive = torch.as_tensor(positive).bool().flatten()
    if scores.shape != positive.shape:
        raise ValueError(f"scores {list(scores.shape)} and positive {list(positive.shape)} must have the same length")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("positive must contain both positive and negative samples")
    rank_sum = average_ranks(scores)[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _check_num_groups(num_groups) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return num_groups
