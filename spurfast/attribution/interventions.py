"""Interventions on neurons: change chosen weight rows, look, put them back bit-exactly.

:func:`intervene` applies an intervention at once and returns an :class:`Intervention`
handle: use it as a context manager (restored on exit, also after an exception) or call
:meth:`Intervention.restore` yourself. Only the affected weights are snapshotted.

Modes (``units`` are ``(layer_name, channel)`` pairs, e.g. from :func:`spurfast.attribution.localize`):

* ``"zero"``: ``W[c] = 0``.
* ``"random_init"``: ``W[c] ~ N(0, sigma^2)``.
* ``"random_noise"``: ``W[c] += N(0, sigma^2)``.
* ``"rewind"``: ``W[c]`` from an earlier state dict ``reference``.
* ``"layer_rewind"``: the whole weight of every layer named in ``units`` from ``reference``.
* ``"unstructured"``: the weights where ``masks[layer]`` is True (from
  :func:`spurfast.attribution.unstructured_threshold`) are zeroed, or drawn from ``N(0, sigma^2)``
  when ``sigma`` is given; ``units`` is not used.

By default only weights are touched (the paper re-initialises a channel's weights); with
``bias=True`` the units' bias entries (the whole bias for ``layer_rewind``) get the same
treatment. ``sigma="init"`` uses, per layer, the standard deviation of PyTorch's default
initialisation of Linear/Conv weights, ``1 / sqrt(3 * fan_in)``.

Random draws come from a ``torch.Generator`` seeded with ``seed`` on the CPU, layer by layer
in module order and channel by channel in ascending order, then are moved to the weight's
device: the same seed gives the same weights on CPU and CUDA and for any order of ``units``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from spurfast.attribution.scores import Unit

MODES = ("zero", "random_init", "random_noise", "rewind", "layer_rewind", "unstructured")
_RANDOM = ("random_init", "random_noise")


def init_sigma(weight: torch.Tensor) -> float:
    """Std of PyTorch's default Linear/Conv weight init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    fan_in = weight[0].numel()
    return 1.0 / math.sqrt(3.0 * fan_in)


def _check_sigma(sigma, mode: str):
    if sigma is None:
        if mode in _RANDOM:
            raise ValueError(f"sigma is required for mode={mode!r} (a float >= 0 or 'init')")
        return None
    if sigma == "init":
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0 or math.isinf(sigma):
        raise ValueError(f"sigma must be a finite float >= 0 or 'init', got {sigma!r}")
    return float(sigma)


def _layer_sigma(sigma, weight: torch.Tensor) -> float:
    return init_sigma(weight) if sigma == "init" else sigma


def _normal(shape, sigma: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    draw = torch.randn(shape, generator=generator, dtype=dtype) * sigma
    return draw.to(device=like.device, dtype=like.dtype)


def _weighted_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 1
    }


def _resolve_units(model: nn.Module, units) -> "OrderedDict[str, List[int]]":
    """``{layer: sorted unique channels}`` in module order; validates names and ranges."""
    if units is None:
        raise ValueError("units is required for this mode: a sequence of (layer_name, channel) pairs")
    if isinstance(units, (str, bytes)) or (isinstance(units, tuple) and len(units) == 2 and isinstance(units[0], str)):
        raise ValueError("units must be a sequence of (layer_name, channel) pairs, e.g. [('conv1', 3)]")
    modules = _weighted_modules(model)
    by_layer: Dict[str, set] = {}
    for item in units:
        try:
            layer, channel = item
        except (TypeError, ValueError):
            raise ValueError(f"units must hold (layer_name, channel) pairs, got {item!r}") from None
        if layer not in modules:
            raise ValueError(f"units: unknown layer {layer!r}; layers with a weight: {list(modules)}")
        if isinstance(channel, bool) or not isinstance(channel, int) and not (
            isinstance(channel, torch.Tensor) and channel.dim() == 0 and not channel.is_floating_point()
        ):
            raise ValueError(f"units: channel must be an int, got {channel!r} for layer {layer!r}")
        channel = int(channel)
        size = modules[layer].weight.shape[0]
        if not 0 <= channel < size:
            raise ValueError(f"units: channel {channel} out of range for layer {layer!r} with {size} neurons")
        by_layer.setdefault(layer, set()).add(channel)
    if not by_layer:
        raise ValueError("units must not be empty")
    order = {n: i for i, n in enumerate(modules)}
    return OrderedDict((n, sorted(by_layer[n])) for n in sorted(by_layer, key=order.__getitem__))


def _reference_tensor(reference, key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in reference:
        raise ValueError(f"reference has no entry {key!r}")
    t = reference[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(like.shape):
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"reference[{key!r}] has shape {shape}, the model's is {list(like.shape)}")
    return t.detach().to(device=like.device, dtype=like.dtype)


class Intervention:
    """An applied intervention; :meth:`restore` (or leaving the ``with`` block) undoes it.

    ``changed``: ``[(parameter name, number of entries changed)]``.
    """

    def __init__(self, model: nn.Module, edits):
        # edits: [(param name, tensor, index or mask or None, new values)], validated already
        self._model = model
        self._snapshots: List[Tuple[torch.Tensor, object, torch.Tensor]] = []
        self.changed: List[Tuple[str, int]] = []
        try:
            with torch.no_grad():
                for pname, tensor, where, new in edits:
                    if where is None:
                        self._snapshots.append((tensor, None, tensor.detach().clone()))
                        tensor.copy_(new)
                        self.changed.append((pname, tensor.numel()))
                    elif where.dtype == torch.bool:
                        self._snapshots.append((tensor, where, tensor.detach().clone()))
                        tensor.copy_(torch.where(where, new, tensor))
                        self.changed.append((pname, int(where.sum())))
                    else:
                        self._snapshots.append((tensor, where, tensor.detach().index_select(0, where).clone()))
                        tensor.index_copy_(0, where, new)
                        self.changed.append((pname, int(where.numel() * tensor[0].numel())))
        except BaseException:
            self.restore()
            raise
        self.active = True

    def restore(self) -> None:
        """Put back every changed weight exactly as it was (idempotent)."""
        with torch.no_grad():
            for tensor, where, saved in reversed(self._snapshots):
                if where is None or where.dtype == torch.bool:
                    tensor.copy_(saved)
                else:
                    tensor.index_copy_(0, where, saved)
        self._snapshots = []
        self.active = False

    def __enter__(self) -> "Intervention":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        return f"Intervention(active={self.active}, changed={self.changed})"


def intervene(
    model: nn.Module,
    units: Optional[Sequence[Tuple[str, int]]] = None,
    mode: str = "zero",
    *,
    sigma: Union[None, float, str] = None,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    seed: int = 0,
    bias: bool = False,
) -> Intervention:
    """Apply an intervention to ``model`` now; returns a handle that restores it.

    Args:
        model: any module; ``units`` name submodules with a ``weight`` (rows = neurons).
        units: ``(layer_name, channel)`` pairs (duplicates are merged).
        mode: one of :data:`MODES` (see the module docstring).
        sigma: std for ``random_init``/``random_noise`` (required there) and optionally
            ``unstructured``; a float or ``"init"``.
        reference: a state dict of the same model (an earlier checkpoint) for ``rewind`` and
            ``layer_rewind``.
        masks: ``{layer_name: bool tensor shaped like its weight}`` for ``unstructured``.
        seed: seeds the CPU generator of the random modes.
        bias: also change the units' bias entries (whole bias for ``layer_rewind``).

    Everything is validated before any weight changes.

    Example::

        >>> import torch, torch.nn as nn, spurfast.attribution as I
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> before = model[0].weight.clone()
        >>> with I.intervene(model, [("0", 1)], "random_init", sigma=0.1, seed=0):
        ...     bool((model[0].weight[1] != before[1]).all()), bool(torch.equal(model[0].weight[0], before[0]))
        (True, True)
        >>> torch.equal(model[0].weight, before)
        True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sigma = _check_sigma(sigma, mode)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if mode in ("rewind", "layer_rewind") and reference is None:
        raise ValueError(f"reference (a state dict) is required for mode={mode!r}")
    generator = torch.Generator().manual_seed(seed)
    modules = _weighted_modules(model)
    edits = []
    if mode == "unstructured":
        if units is not None:
            raise ValueError("units: mode='unstructured' takes masks, not units")
        if not masks:
            raise ValueError("masks is required for mode='unstructured': {layer_name: bool tensor like its weight}")
        order = {n: i for i, n in enumerate(modules)}
        for layer in masks:
            if layer not in modules:
                raise ValueError(f"masks: unknown layer {layer!r}; layers with a weight: {list(modules)}")
        for layer in sorted(masks, key=order.__getitem__):
            w = modules[layer].weight
            mask = masks[layer]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"masks[{layer!r}] must be a bool tensor of shape {list(w.shape)}")
            new = torch.zeros_like(w) if sigma is None else _normal(w.shape, _layer_sigma(sigma, w), generator, w)
            edits.append((f"{layer}.weight", w, mask.to(w.device), new))
        return Intervention(model, edits)
    if masks is not None:
        raise ValueError(f"masks is only used by mode='unstructured', not {mode!r}")
    per_layer = _resolve_units(model, units)
    for layer, channels in per_layer.items():
        module = modules[layer]
        params = [("weight", module.weight)]
        if bias and isinstance(getattr(module, "bias", None), torch.Tensor):
            params.append(("bias", module.bias))
        for pname, p in params:
            key = f"{layer}.{pname}"
            if mode == "layer_rewind":
                edits.append((key, p, None, _reference_tensor(reference, key, p)))
                continue
            rows = torch.tensor(channels, dtype=torch.long, device=p.device)
            shape = (len(channels),) + tuple(p.shape[1:])
            s = _layer_sigma(sigma, module.weight) if sigma is not None else None
            if mode == "zero":
                new = torch.zeros(shape, dtype=p.dtype, device=p.device)
            elif mode == "random_init":
                new = _normal(shape, s, generator, p)
            elif mode == "random_noise":
                new = p.detach().index_select(0, rows) + _normal(shape, s, generator, p)
            else:  # rewind
                new = _reference_tensor(reference, key, p).index_select(0, rows)
            edits.append((key, p, rows, new))
    return Intervention(model, edits)


def random_units_like(
    model: nn.Module,
    units: Sequence[Tuple[str, int]],
    generator: torch.Generator,
    avoid: Optional[Sequence[Tuple[str, int]]] = None,
) -> List[Unit]:
    """A random control for ``units``: as many units per layer as ``units`` has, drawn
    uniformly without replacement among that layer's other neurons (not in ``units`` nor
    ``avoid``)."""
    per_layer = _resolve_units(model, units)
    modules = _weighted_modules(model)
    banned = {(u[0], int(u[1])) for u in list(units) + list(avoid or [])}
    out = []
    for layer, channels in per_layer.items():
        free = [c for c in range(modules[layer].weight.shape[0]) if (layer, c) not in banned]
        if len(free) < len(channels):
            raise ValueError(
                f"units: layer {layer!r} has only {len(free)} neurons outside the selection, "
                f"cannot draw {len(channels)} random control units"
            )
        pick = torch.randperm(len(free), generator=generator)[: len(channels)]
        out += [Unit(layer, free[int(i)]) for i in pick.sort().values]
    return out
