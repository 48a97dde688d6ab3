"""Per-sample memorization: TracIn-style self-influence, overall or restricted to chosen neurons.

* :func:`self_influence` -- ``sum_t lr_t ||dl_n/dW(theta_t)||^2`` over checkpoints, per sample.
* :func:`top_samples` -- per neuron, the training samples that load its weight row most.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.attribution.scores import (
    Unit,
    _as_units,
    _batches,
    _check_batch_size,
    _clear_grads,
    _model_device,
    as_tensors,
    scoring_state,
    tracked_layers,
)
from spurfast.capture import NeuronStats


def self_influence(
    model: nn.Module,
    dataset,
    checkpoints: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    lrs: Union[float, Sequence[float]] = 1.0,
    *,
    units=None,
    per_unit: bool = False,
    batch_size: int = 256,
    backend: str = "auto",
    layers=None,
) -> torch.Tensor:
    """TracIn-style self-influence of every sample: ``sum_t lr_t * ||dl_n/dW(theta_t)||^2``.

    ``checkpoints``: state dicts of ``model`` (``None``: the current weights), each loaded in
    turn; ``lrs``: the learning rate in effect at each (one number for all). The squared norm
    runs over the weights (not biases) of every tracked layer, or only over the rows listed in
    ``units``. Returns ``[N]`` float64 in dataset order, or ``[N, U]`` (one column per unit,
    in the given order) with ``per_unit=True``. The model's weights, buffers, modes and
    ``.grad`` are restored afterwards.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as S
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> S.self_influence(model, data).shape
        torch.Size([40])
        >>> S.self_influence(model, data, units=[("0", 3), ("2", 1)], per_unit=True).shape
        torch.Size([40, 2])
    """
    _check_batch_size(batch_size)
    x, y, _ = as_tensors(dataset, "dataset")
    if checkpoints is None:
        checkpoints = [None]
    elif isinstance(checkpoints, Mapping) or len(checkpoints) == 0:
        raise ValueError("checkpoints must be None or a non-empty sequence of state dicts")
    if isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
        lrs = [float(lrs)] * len(checkpoints)
    lrs = [float(lr) for lr in lrs]
    if len(lrs) != len(checkpoints):
        raise ValueError(f"lrs must be one number or one per checkpoint ({len(checkpoints)}), got {len(lrs)}")
    if units is not None:
        units = _as_units(units)
        if not units:
            raise ValueError("units must not be empty")
        known = tracked_layers(model, layers)
        for u in units:
            if u.layer not in known:
                raise ValueError(f"units: layer {u.layer!r} is not a tracked layer of the model ({known})")
        unit_layers = list(OrderedDict.fromkeys(u.layer for u in units))
        modules = dict(model.named_modules())
        for u in units:
            c = modules[u.layer].weight.shape[0]
            if not 0 <= u.channel < c:
                raise ValueError(f"units: channel {u.channel} out of range for layer {u.layer!r} with {c} neurons")
        layers = unit_layers
    elif per_unit:
        raise ValueError("per_unit=True needs units")
    device = _model_device(model)
    params = list(model.parameters())
    n = x.shape[0]
    width = len(units) if per_unit else 1
    total = torch.zeros(n, width, dtype=torch.float64)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with scoring_state(model):
        stats = NeuronStats(model, 1, loss_reduction="sum", backend=backend, layers=layers,
                            track_group_grad=False, track_activations=False)
        try:
            for state, lr in zip(checkpoints, lrs):
                if state is not None:
                    model.load_state_dict(state)
                for s in _batches(n, batch_size):
                    zeros = torch.zeros(s.stop - s.start, dtype=torch.long, device=device)
                    with stats.record(zeros):
                        F.cross_entropy(model(x[s].to(device)), y[s].to(device), reduction="sum").backward()
                    _clear_grads(params)
                    if units is None:
                        part = sum(t.double().sum(1).cpu() for t in stats.last_grad_sq.values()).unsqueeze(1)
                    else:
                        cols = torch.stack([stats.last_grad_sq[u.layer][:, u.channel].double().cpu() for u in units], 1)
                        part = cols if per_unit else cols.sum(1, keepdim=True)
                    total[s] += lr * part
        finally:
            stats.remove()
            model.load_state_dict(original)
    return total if per_unit else total.squeeze(1)


def top_samples(
    model: nn.Module,
    dataset,
    units,
    k: int = 10,
    checkpoints: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    lrs: Union[float, Sequence[float]] = 1.0,
    **kwargs,
) -> Dict[Unit, Tuple[torch.Tensor, torch.Tensor]]:
    """For each unit, the ``k`` training samples that load it most.

    A sample's load on a unit is its self-influence restricted to that unit's weight row
    (:func:`self_influence` with ``per_unit=True``). Returns ``{unit: (indices [k] int64,
    loads [k] float64)}``, largest load first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    units = _as_units(units)
    loads = self_influence(model, dataset, checkpoints, lrs, units=units, per_unit=True, **kwargs)
    k = min(k, loads.shape[0])
    out = {}
    for j, u in enumerate(units):
        values, indices = torch.topk(loads[:, j], k)
        out[u] = (indices, values)
    return out
