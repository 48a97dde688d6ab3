"""The exact ablation oracle: remove each unit alone and measure every group, many units per forward.

:func:`ablation_oracle` answers, for each unit, what zeroing (or re-initialising) its weight
row does to each group's accuracy and mean objective, exactly, not to first order. It never
writes a weight: the batch is replicated once per unit and, in unit u's replica only, the
unit's output channel is replaced by what the changed row computes (``b[c]`` for a zeroed row
of a layer with bias, ``0`` without; ``x . r + b[c]`` for a random row r), which is the
weight-row change itself for a model whose samples do not interact (eval mode). Many units
thus share one batched forward, and the model's weights and buffers are never touched.

The engine underneath, :func:`evaluate_variants`, evaluates any list of *variants*, each a set
of units removed together; :func:`~spurfast.attribution.verify.iterative_localize` uses it for
greedy multi-unit selections.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.attribution.interventions import _check_sigma, _layer_sigma, _normal
from spurfast.attribution.objectives import check_objective, per_sample_objective
from spurfast.attribution.scores import (
    DEFAULT_EXCLUDE,
    Unit,
    _as_units,
    _check_batch_size,
    _check_num_groups,
    _eligible,
    _model_device,
    as_tensors,
    classifier_name,
    scoring_state,
    tracked_layers,
)
from spurfast.capture import _prepare_input

ORACLE_MODES = ("zero", "random_init")


@dataclasses.dataclass
class OracleResult:
    """What removing each unit alone did, per group (accuracies as fractions).

    ``acc_before [G]``, ``acc_after [U, G]``, ``objective_before [G]`` and ``objective_after [U, G]``
    (mean margin or loss), ``count [G]``; with ``per_sample=True`` also ``correct_before [N]`` and
    ``correct_after [U, N]`` (bool). ``seconds`` is the wall time of the whole call.
    """

    units: List[Unit]
    mode: str
    sigma: Optional[Union[str, float]]
    objective: str
    count: torch.Tensor
    acc_before: torch.Tensor
    acc_after: torch.Tensor
    objective_before: torch.Tensor
    objective_after: torch.Tensor
    seconds: float
    correct_before: Optional[torch.Tensor] = None
    correct_after: Optional[torch.Tensor] = None

    @property
    def drop(self) -> torch.Tensor:
        """``[U, G]`` accuracy drop in points (positive: the group lost accuracy)."""
        return 100.0 * (self.acc_before.unsqueeze(0) - self.acc_after)

    @property
    def seconds_per_unit(self) -> float:
        return self.seconds / max(1, len(self.units))

    def index(self, unit: Tuple[str, int]) -> int:
        return self.units.index(Unit(str(unit[0]), int(unit[1])))

    def flipped(self, unit: Tuple[str, int]) -> torch.Tensor:
        """Sample indices (ascending) classified correctly before and wrongly with ``unit`` removed."""
        if self.correct_after is None:
            raise ValueError("per-sample results were not kept; call ablation_oracle(..., per_sample=True)")
        row = self.correct_after[self.index(unit)]
        return (self.correct_before & ~row).nonzero().squeeze(1)

    def to_dict(self) -> Dict[str, object]:
        return {
            "mode": self.mode, "sigma": self.sigma, "objective": self.objective,
            "units": [f"{u.layer}:{u.channel}" for u in self.units],
            "count": self.count.tolist(),
            "acc_before": [round(100 * float(a), 3) for a in self.acc_before],
            "drop": [[round(float(d), 3) for d in row] for row in self.drop],
            "objective_before": [round(float(v), 5) for v in self.objective_before],
            "objective_after": [[round(float(v), 5) for v in row] for row in self.objective_after],
            "seconds": round(self.seconds, 3),
            "seconds_per_unit": round(self.seconds_per_unit, 5),
        }


def _channel_rows(module: nn.Module, x_in: torch.Tensor, row: torch.Tensor, channel: int) -> torch.Tensor:
    """What output channel ``channel`` computes (bias excluded) with weight row ``row``, for input ``x_in``."""
    if isinstance(module, nn.Linear):
        return x_in.matmul(row.to(x_in.dtype))  # [b, *]
    x, (stride, padding, dilation, groups) = _prepare_input(module, x_in)
    per_group_in = module.weight.shape[1]
    conv_group = channel // (module.weight.shape[0] // groups)
    x = x[:, conv_group * per_group_in:(conv_group + 1) * per_group_in]
    conv = F.conv1d if module.weight.dim() == 3 else F.conv2d
    return conv(x, row.unsqueeze(0).to(x.dtype), None, stride, padding, dilation, 1)[:, 0]


class _Edits:
    """Per layer: ``[(replica, channel, new_row or None for zero)]``."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.by_layer: Dict[str, List[Tuple[int, int, Optional[torch.Tensor]]]] = {}

    def add(self, replica: int, unit: Unit, row: Optional[torch.Tensor]) -> None:
        self.by_layer.setdefault(unit.layer, []).append((replica, unit.channel, row))

    def hooks(self, rows_per_replica: int):
        handles = []
        for layer, edits in self.by_layer.items():
            module = self.modules[layer]
            handles.append(module.register_forward_hook(self._hook(module, edits, rows_per_replica)))
        return handles

    @staticmethod
    def _hook(module, edits, b):
        linear = isinstance(module, nn.Linear)

        def hook(mod, inputs, out):
            bias = mod.bias
            for replica, channel, row in edits:
                sl = slice(replica * b, (replica + 1) * b)
                value = 0.0 if bias is None else bias[channel].to(out.dtype)
                if row is not None:
                    value = _channel_rows(mod, inputs[0][sl], row, channel) + value
                if linear:
                    out[sl, ..., channel] = value
                else:
                    out[sl, channel] = value
            return out

        return hook


def _variant_row(module: nn.Module, unit: Unit, mode: str, sigma, seed: int) -> Optional[torch.Tensor]:
    if mode == "zero":
        return None
    # The draw of intervene(model, [unit], "random_init", sigma=sigma, seed=seed).
    weight = module.weight
    generator = torch.Generator().manual_seed(seed)
    return _normal((1,) + tuple(weight.shape[1:]), _layer_sigma(sigma, weight), generator, weight)[0]


@torch.no_grad()
def evaluate_variants(
    model: nn.Module,
    dataset,
    variants: Sequence[Sequence[Tuple[str, int]]],
    objective: str = "margin",
    *,
    mode: str = "zero",
    sigma: Union[str, float] = "init",
    seed: int = 0,
    batch_size: int = 256,
    max_rows: int = 2048,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(correct [V, N] bool, objective [V, N] float32)`` with each variant's units removed together.

    The model is run as it is (call it in eval mode); ``batch_size`` samples are replicated
    ``max_rows // batch_size`` times per forward. For ``random_init`` every unit of a variant
    gets the row ``intervene(model, [unit], "random_init", sigma=sigma, seed=seed)`` draws.
    """
    if mode not in ORACLE_MODES:
        raise ValueError(f"mode must be one of {ORACLE_MODES}, got {mode!r}")
    check_objective(objective)
    _check_batch_size(batch_size)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    x, y, _ = as_tensors(dataset, "dataset")
    modules = dict(model.named_modules())
    variants = [_as_units(v, "variants") for v in variants]
    rows_cache: Dict[Unit, Optional[torch.Tensor]] = {}
    for v in variants:
        for u in v:
            module = modules.get(u.layer)
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                raise ValueError(f"variants: {u.layer!r} is not an nn.Linear/nn.Conv1d/nn.Conv2d of the model")
            if not 0 <= u.channel < module.weight.shape[0]:
                raise ValueError(f"variants: channel {u.channel} out of range for layer {u.layer!r}")
            if u not in rows_cache:
                rows_cache[u] = _variant_row(module, u, mode, sigma, seed)
    device = _model_device(model)
    n = x.shape[0]
    correct = torch.zeros(len(variants), n, dtype=torch.bool)
    values = torch.zeros(len(variants), n)
    b = max(1, min(batch_size, n, max_rows))
    per_forward = max(1, max_rows // b)
    for start in range(0, n, b):
        xb, yb = x[start:start + b].to(device), y[start:start + b].to(device)
        rows = xb.shape[0]
        for v0 in range(0, len(variants), per_forward):
            chunk = variants[v0:v0 + per_forward]
            edits = _Edits(modules)
            for j, units in enumerate(chunk):
                for u in units:
                    edits.add(j, u, rows_cache[u])
            handles = edits.hooks(rows)
            try:
                logits = model(xb.repeat(len(chunk), *([1] * (xb.dim() - 1))))
            finally:
                for h in handles:
                    h.remove()
            labels = yb.repeat(len(chunk))
            value = per_sample_objective(logits.float(), labels, objective)
            right = logits.argmax(1) == labels
            correct[v0:v0 + len(chunk), start:start + rows] = right.view(len(chunk), rows).cpu()
            values[v0:v0 + len(chunk), start:start + rows] = value.view(len(chunk), rows).cpu()
    return correct, values


def _group_means(per_sample: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[V, G]`` means over each group's samples of ``per_sample [V, N]`` (NaN for empty groups)."""
    sums = torch.zeros(per_sample.shape[0], num_groups, dtype=torch.float64)
    sums.index_add_(1, group_ids, per_sample.double())
    count = torch.bincount(group_ids, minlength=num_groups).double()
    return sums / count  # 0/0 = NaN for empty groups


def ablation_oracle(
    model: nn.Module,
    dataset,
    num_groups: int,
    units: Optional[Sequence[Tuple[str, int]]] = None,
    mode: str = "zero",
    *,
    sigma: Union[str, float] = "init",
    seed: int = 0,
    objective: str = "margin",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    layers=None,
    per_sample: bool = False,
    batch_size: int = 256,
    max_rows: int = 2048,
) -> OracleResult:
    """Exact per-group effect of removing each unit alone.

    Args:
        model: evaluated in eval mode and left exactly as found (weights are never written).
        dataset: anything :func:`~spurfast.attribution.scores.as_tensors` accepts.
        num_groups: number of groups G.
        units: ``(layer, channel)`` pairs; default every eligible unit (tracked layers minus
            ``exclude``, as in :func:`~spurfast.attribution.localize`).
        mode: ``"zero"`` (``W[c] = 0``, bias kept) or ``"random_init"`` (``W[c] ~ N(0, sigma^2)``,
            the draw ``intervene(model, [unit], "random_init", sigma=sigma, seed=seed)`` makes).
        objective: ``"margin"`` or ``"loss"``, whose group means are reported beside accuracy.
        per_sample: also keep every sample's correctness before and after (``[U, N]`` bools).
        batch_size, max_rows: samples per batch, and rows (replicas x samples) per forward.

    Cost: one forward of the dataset per unit, ``max_rows`` rows at a time, no weight copies;
    ``result.seconds_per_unit`` reports it.

    Example::

        >>> import torch, torch.nn as nn, spurfast as sf
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = (torch.randn(40, 5), torch.randint(0, 2, (40,)), torch.arange(40) % 4)
        >>> result = sf.ablation_oracle(model, data, num_groups=4)
        >>> len(result.units), result.drop.shape
        (8, torch.Size([8, 4]))
    """
    started = time.perf_counter()
    _check_num_groups(num_groups)
    check_objective(objective)
    if mode not in ORACLE_MODES:
        raise ValueError(f"mode must be one of {ORACLE_MODES}, got {mode!r}")
    sigma = _check_sigma(sigma, "random_init") if mode == "random_init" else None
    if not isinstance(per_sample, bool):
        raise ValueError(f"per_sample must be a bool, got {per_sample!r}")
    x, y, g = as_tensors(dataset, "dataset", num_groups)
    if units is None:
        names = _eligible(tracked_layers(model, layers), exclude, classifier_name(model, layers), "exclude")
        if not names:
            raise ValueError(f"exclude={tuple(exclude)!r} removes every tracked layer; nothing to ablate")
        modules = dict(model.named_modules())
        units = [Unit(n, c) for n in names for c in range(modules[n].weight.shape[0])]
    else:
        units = _as_units(units)
        if not units:
            raise ValueError("units must not be empty")
    with scoring_state(model):
        base_correct, base_value = evaluate_variants(model, (x, y, g), [[]], objective, mode=mode, sigma=sigma or 0.0,
                                                     seed=seed, batch_size=batch_size, max_rows=max_rows)
        correct, value = evaluate_variants(model, (x, y, g), [[u] for u in units], objective, mode=mode,
                                           sigma=sigma or 0.0, seed=seed, batch_size=batch_size, max_rows=max_rows)
    count = torch.bincount(g, minlength=num_groups)
    return OracleResult(
        units=units, mode=mode, sigma=sigma, objective=objective, count=count,
        acc_before=_group_means(base_correct.float(), g, num_groups)[0],
        acc_after=_group_means(correct.float(), g, num_groups),
        objective_before=_group_means(base_value, g, num_groups)[0],
        objective_after=_group_means(value, g, num_groups),
        seconds=time.perf_counter() - started,
        correct_before=base_correct[0] if per_sample else None,
        correct_after=correct if per_sample else None,
    )

