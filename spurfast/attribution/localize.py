"""Localization: the top-k neurons ``Unit(layer, channel)`` of any score."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Union

import torch

from spurfast.attribution.scores import DEFAULT_EXCLUDE, NeuronScores, Unit, _eligible


def localize(
    scores: Union[NeuronScores, Mapping[str, torch.Tensor]],
    k: int,
    group: Optional[int] = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    per_layer: bool = False,
) -> List[Unit]:
    """The ``k`` highest-scoring neurons, as ``Unit(layer, channel)``, best first.

    Global greedy top-k: every eligible neuron of every layer is ranked by its raw score
    (ties: module order, then channel). ``per_layer=True`` takes the top ``k`` of each layer
    instead (layers in module order, each best first). For grouped ``[G, C]`` scores,
    ``group`` picks the row.

    ``exclude``: patterns of layers never selected. A pattern matches a layer whose name
    equals it, lies under it (``"layer1"`` matches ``"layer1.0.conv1"``), or has a dotted part
    starting with it (``"bn"`` matches ``"layer1.0.bn1"``). :data:`CLASSIFIER` stands for the
    final classifier (``scores.classifier``; for a plain dict, its last layer). Default
    :data:`DEFAULT_EXCLUDE`; pass ``()`` to rank every layer.

    Example::

        >>> import torch, spurfast.attribution as S
        >>> scores = {"conv1": torch.tensor([0.1, 0.9]), "conv2": torch.tensor([0.5, 0.7, 0.2]),
        ...           "fc": torch.tensor([9.0, 9.0])}
        >>> S.localize(scores, k=3)
        [Unit(layer='conv1', channel=1), Unit(layer='conv2', channel=1), Unit(layer='conv2', channel=0)]
        >>> S.localize(scores, k=1, exclude=())
        [Unit(layer='fc', channel=0)]
    """
    if not isinstance(scores, NeuronScores):
        if not isinstance(scores, Mapping):
            raise TypeError(f"scores must be NeuronScores or a dict of tensors, got {type(scores).__name__}")
        values = {n: torch.as_tensor(t) for n, t in scores.items()}
        scores = NeuronScores(values, "custom", classifier=list(values)[-1] if values else None)
    if scores.grouped:
        if group is None:
            raise ValueError(f"group: {scores.kind} scores are per group ([G, C]); say which group to localize")
        scores = scores.for_group(group)
    elif group is not None:
        raise ValueError(f"group: {scores.kind} scores are not per group; pass group=None")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    names = _eligible(scores.layer_names, exclude, scores.classifier, "exclude")
    if not names:
        raise ValueError(f"exclude={tuple(exclude)!r} removes every layer of {scores.layer_names}")
    for n in names:
        if torch.isnan(scores[n]).any():
            raise ValueError(f"scores: layer {n!r} has NaN scores (a group with no samples?)")
    if per_layer:
        units = []
        for n in names:
            order = torch.sort(scores[n].double().cpu(), descending=True, stable=True).indices[:k]
            units += [Unit(n, int(c)) for c in order]
        return units
    flat = torch.cat([scores[n].double().cpu().flatten() for n in names])
    if k > flat.numel():
        raise ValueError(f"k={k} exceeds the {flat.numel()} eligible neurons")
    owner = [(n, c) for n in names for c in range(scores[n].numel())]
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return [Unit(*owner[int(i)]) for i in order]


def rank_all(
    scores: Union[NeuronScores, Mapping[str, torch.Tensor]],
    group: Optional[int] = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> List[Unit]:
    """Every eligible neuron, best first: :func:`localize` with ``k`` = the number of eligible neurons."""
    eligible = len(localize(scores, k=10**9, group=group, exclude=exclude, per_layer=True))
    return localize(scores, k=eligible, group=group, exclude=exclude)
