"""Neuron and weight masks over a model's parameters, and the masked forward that shares weights.

A :class:`Mask` holds boolean selections keyed by parameter name (``model.named_parameters()``),
``True`` = selected. For a parameter of shape ``[C, ...]`` an entry is either

* a **row** entry, ``[C]``: whole rows ``W[c, ...]``, i.e. neurons / output channels;
* an **element** entry, the parameter's full shape.

For a 1-D parameter (a bias) both coincide and the entry counts as a row entry. A parameter
without an entry has nothing selected; ``~`` inverts within the covered parameters only.

Builders: :meth:`Mask.from_units` (the units :func:`spurfast.localize` returns),
:meth:`Mask.smallest_magnitude` (the global 1 % of You et al. 2025), :meth:`Mask.top_gradient_channels`
(from a :class:`~spurfast.NeuronStats`), :meth:`Mask.from_dict` and ``Mask(entries, shapes)``.
Masks combine with ``|``, ``&``, ``~`` and are saved as safetensors (:meth:`Mask.save`, :meth:`Mask.load`).

:func:`masked` (a context manager) and :func:`masked_call` run the model with the *selected*
entries zeroed: the *masked branch*. Weights are shared: gradients of the masked branch flow
into the same ``Parameter`` objects (zero for the selected entries), nothing is copied.

How it works. While the model (or, called on its own, a module owning a covered parameter)
runs a forward inside the block, each owning module has an instance attribute of the
parameter's name holding ``where(selected, 0, param)``; ordinary attribute lookup finds it
before ``nn.Module.__getattr__`` reaches ``_parameters``. Forward hooks set these attributes
when the call starts (a fresh tensor per call, so every forward builds its own graph under its
own grad mode: several forwards and backwards per block are fine) and remove them when it
ends. So inside any call, every read of ``module.weight`` -- the module's own forward, a
``F.conv2d(x, self.conv.weight)`` in a parent's forward, a tied weight -- is the masked tensor;
between calls the attributes are the dense Parameters (``model.fc.weight.grad`` works in the
block). ``_parameters``, ``named_parameters()``, ``state_dict()`` and optimizers always see the
dense Parameters. On exit (also after an exception) the hooks are removed and nothing is left.
Calling a method that is not ``forward`` (``model.forward_features(x)``) masks the submodules it
calls, each during its own call.

BatchNorm (any ``_NormBase`` layer tracking running statistics) in the masked branch, ``bn=``:

* ``"batch"`` (default): the layer does what its current mode says -- batch statistics in train
  mode, running statistics in eval mode -- but never updates ``running_mean``/``running_var``/
  ``num_batches_tracked``. A dense + masked training step thus updates them once, from the
  dense branch, and the running statistics describe the dense network.
* ``"running"``: normalise with the running statistics (as in eval mode), no update.
* ``"update"``: an ordinary forward: in train mode the running statistics are updated a
  second time, from the masked branch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from spurfast._files import save_safetensors_atomic
from spurfast.capture import NeuronStats

__all__ = ["BN_MODES", "GRADIENT_STATISTICS", "Mask", "masked", "masked_call"]

BN_MODES = ("batch", "running", "update")
GRADIENT_STATISTICS = ("gradient", "grad_sq")
_METADATA_KEY = "spurfast_mask"
_FORMAT = 1


def _shape(shape) -> torch.Size:
    try:
        out = torch.Size([int(s) for s in shape])
    except (TypeError, ValueError):
        raise ValueError(f"shapes: expected a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"shapes: negative size in {list(out)}")
    return out


def _count_of(n_rows: int, shape: torch.Size) -> int:
    return n_rows * (math.prod(shape[1:]) if len(shape) > 1 else 1)


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return float(fraction)


def _how_many(fraction: float, total: int) -> int:
    """``fraction * total`` rounded to the nearest int (halves up), so 1 % of 1000 is exactly 10."""
    return min(total, int(math.floor(fraction * total + 0.5)))


def _parameter_table(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """Every name a parameter goes by, tied aliases included, in module order."""
    return OrderedDict(model.named_parameters(remove_duplicate=False))


class Mask:
    """Boolean selections over a model's parameters, keyed by parameter name; ``True`` = selected.

    Args:
        entries: ``{parameter name: bool tensor}``, each ``[C]`` (rows) or the parameter's shape.
        shapes: ``{parameter name: the parameter's shape}``, the same names as ``entries``.

    Attributes:
        entries: ``{name: bool tensor}`` on the CPU (private copies).
        shapes: ``{name: torch.Size}``.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.masks import Mask
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> mask = Mask.from_units(model, [("0", 1)])          # neuron 1 of layer "0": W[1, :] and b[1]
        >>> sorted(mask.entries), mask.rows("0.weight").tolist(), mask.count()
        (['0.bias', '0.weight'], [False, True, False], 5)
        >>> (~mask).count(), (mask | ~mask).fraction()
        (10, 1.0)
    """

    def __init__(self, entries: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]):
        if not isinstance(entries, Mapping):
            raise TypeError(f"entries must be a dict of bool tensors, got {type(entries).__name__}")
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes must be a dict of shapes, got {type(shapes).__name__}")
        missing = [n for n in entries if n not in shapes]
        extra = [n for n in shapes if n not in entries]
        if missing or extra:
            raise ValueError(
                f"entries and shapes must name the same parameters; without a shape: {missing}, without an entry: {extra}"
            )
        self.entries: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.shapes: "OrderedDict[str, torch.Size]" = OrderedDict()
        for name, entry in entries.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"entries: names must be non-empty strings, got {name!r}")
            shape = _shape(shapes[name])
            if not isinstance(entry, torch.Tensor) or entry.dtype != torch.bool:
                what = entry.dtype if isinstance(entry, torch.Tensor) else type(entry).__name__
                raise ValueError(f"entries[{name!r}] must be a bool tensor, got {what}")
            rows_shape = torch.Size(shape[:1])
            if entry.shape != shape and not (len(shape) >= 1 and entry.shape == rows_shape):
                raise ValueError(
                    f"entries[{name!r}] has shape {list(entry.shape)}; expected {list(rows_shape)} (rows) or "
                    f"{list(shape)} (elements) for a parameter of shape {list(shape)}"
                )
            self.entries[name] = entry.detach().to("cpu", copy=True).contiguous()
            self.shapes[name] = shape

    # ------------------------------------------------------------------ builders
    @classmethod
    def empty(cls) -> "Mask":
        """A mask that covers and selects nothing."""
        return cls({}, {})

    @classmethod
    def from_dict(cls, model: nn.Module, selections: Mapping[str, torch.Tensor]) -> "Mask":
        """A mask from ``{parameter name: bool tensor [C] or full-shape}``, shapes read from ``model``.

        Every name must be a parameter of ``model`` (``ValueError`` naming the key otherwise).

        Example::

            >>> import torch, torch.nn as nn
            >>> from spurfast.masks import Mask
            >>> model = nn.Linear(3, 2)
            >>> Mask.from_dict(model, {"weight": torch.tensor([True, False])}).count()
            3
        """
        _check_model(model)
        if not isinstance(selections, Mapping):
            raise TypeError(f"selections must be a dict of bool tensors, got {type(selections).__name__}")
        table = _parameter_table(model)
        for name in selections:
            if name not in table:
                raise ValueError(_unknown(name, table, "selections"))
        return cls(selections, {n: table[n].shape for n in selections})

    @classmethod
    def from_units(cls, model: nn.Module, units: Iterable, bias: bool = True) -> "Mask":
        """Rows of the given neurons: ``units`` are ``Unit(layer, channel)`` / ``(layer, channel)`` pairs.

        Selects row ``channel`` of ``<layer>.weight`` and, with ``bias=True``, ``<layer>.bias[channel]``
        when the layer has a bias. Layers are module names (as :func:`spurfast.localize` returns them).
        An empty ``units`` gives an empty mask.

        Example::

            >>> import torch.nn as nn
            >>> from spurfast.masks import Mask
            >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            >>> Mask.from_units(model, [("0", 0), ("0", 3)], bias=False).rows("0.weight").tolist()
            [True, False, False, True]
        """
        _check_model(model)
        if isinstance(units, (str, bytes)) or (isinstance(units, tuple) and len(units) == 2 and isinstance(units[0], str)):
            raise ValueError("units must be a sequence of (layer, channel) pairs, e.g. [('features.conv1', 3)]")
        modules = dict(model.named_modules())
        table = _parameter_table(model)
        entries: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        shapes: Dict[str, torch.Size] = {}
        chosen: List[Tuple[str, int]] = []
        for item in units:
            try:
                layer, channel = item
            except (TypeError, ValueError):
                raise ValueError(f"units must hold (layer, channel) pairs, got {item!r}") from None
            module = modules.get(layer) if isinstance(layer, str) else None
            weight = getattr(module, "weight", None) if module is not None else None
            if not isinstance(weight, nn.Parameter) or weight.dim() < 1:
                raise ValueError(f"units: {layer!r} is not a module of the model with a weight parameter")
            if isinstance(channel, bool) or not isinstance(channel, int) and not (
                isinstance(channel, torch.Tensor) and channel.dim() == 0 and not channel.is_floating_point()
            ):
                raise ValueError(f"units: channel must be an int, got {channel!r} for layer {layer!r}")
            channel = int(channel)
            if not 0 <= channel < weight.shape[0]:
                raise ValueError(f"units: channel {channel} out of range for layer {layer!r} with {weight.shape[0]} rows")
            chosen.append((layer, channel))
        order = {n: i for i, n in enumerate(table)}
        for layer, channel in chosen:
            module = modules[layer]
            names = [f"{layer}.weight" if layer else "weight"]
            if bias and isinstance(getattr(module, "bias", None), nn.Parameter):
                names.append(f"{layer}.bias" if layer else "bias")
            for name in names:
                p = table[name]
                if name not in entries:
                    entries[name] = torch.zeros(p.shape[0], dtype=torch.bool)
                    shapes[name] = p.shape
                entries[name][channel] = True
        ordered = sorted(entries, key=order.__getitem__)
        return cls(OrderedDict((n, entries[n]) for n in ordered), shapes)

    @classmethod
    def smallest_magnitude(cls, model: nn.Module, fraction: float, params: Optional[Sequence[str]] = None) -> "Mask":
        """The ``fraction`` of weights with the smallest ``|w|``, ranked globally over ``params``.

        ``params``: parameter names; default the weights of every ``nn.Linear`` and ``nn.Conv*``
        (the classifier included), in module order. Exactly ``round(fraction * N)`` of the ``N``
        weights are selected (halves up); ties at the threshold go to the earlier parameter,
        then the earlier position (row-major). The mask covers every parameter in ``params``,
        so ``~mask`` is the kept weights. Element entries.

        Example::

            >>> import torch, torch.nn as nn
            >>> from spurfast.masks import Mask
            >>> model = nn.Linear(10, 10)
            >>> mask = Mask.smallest_magnitude(model, 0.05)
            >>> mask.count(), list(mask.entries)
            (5, ['weight'])
            >>> bool(model.weight.abs()[mask.entries["weight"]].max() <= model.weight.abs()[~mask.entries["weight"]].min())
            True
        """
        _check_model(model)
        fraction = _check_fraction(fraction)
        table = _parameter_table(model)
        if params is None:
            seen, names = set(), []
            for mname, module in model.named_modules():
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(module.weight, nn.Parameter):
                    if id(module.weight) not in seen:  # a tied weight is ranked once
                        seen.add(id(module.weight))
                        names.append(f"{mname}.weight" if mname else "weight")
            if not names:
                raise ValueError("model has no nn.Linear/nn.Conv weight; pass params=[names]")
        else:
            if isinstance(params, str):
                raise ValueError("params must be a sequence of parameter names, not a single string")
            names = list(params)
            if not names:
                raise ValueError("params must name at least one parameter")
            for n in names:
                if n not in table:
                    raise ValueError(_unknown(n, table, "params"))
            if len(set(names)) != len(names) or len({id(table[n]) for n in names}) != len(names):
                raise ValueError(f"params names a parameter twice (or two names of one tied parameter): {names}")
        weights = [table[n].detach() for n in names]
        for n, w in zip(names, weights):
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"params: {n!r} has non-finite values; magnitudes cannot be ranked")
        flat = torch.cat([w.abs().flatten().double().cpu() for w in weights])  # [N]
        k = _how_many(fraction, flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.sort(flat, stable=True).indices[:k]] = True
        entries, start = OrderedDict(), 0
        for n, w in zip(names, weights):
            entries[n] = chosen[start:start + w.numel()].reshape(w.shape)
            start += w.numel()
        return cls(entries, {n: table[n].shape for n in names})

    @classmethod
    def top_gradient_channels(
        cls,
        stats: NeuronStats,
        fraction: float,
        group: Optional[int] = None,
        *,
        statistic: str = "gradient",
        bias: bool = True,
        layers: Optional[Sequence[str]] = None,
    ) -> "Mask":
        """The ``fraction`` of output channels with the largest gradient norm, ranked globally.

        Reads a :class:`~spurfast.NeuronStats` after recorded backward passes. Per tracked
        layer and channel c (``layers``: restrict to these tracked layers):

        * ``statistic="gradient"`` (default): ``||sum_n dl_n/dW[c]||_2``, the norm of the
          accumulated gradient over every recorded sample (from ``group_grad``; needs
          ``track_group_grad=True``); with ``group=g`` only group g's samples.
        * ``statistic="grad_sq"``: ``sqrt(sum_n ||dl_n/dW[c]||^2)`` over the recorded samples
          (of group g), from ``grad_sq_sum``.

        Exactly ``round(fraction * R)`` of the ``R`` rows of those layers are selected (halves
        up); ties go to the earlier layer (module order), then the lower channel. Row entries
        on ``<layer>.weight`` (and ``<layer>.bias`` with ``bias=True``) for every ranked layer.

        Example::

            >>> import torch, torch.nn as nn, torch.nn.functional as F, spurfast as sf
            >>> from spurfast.masks import Mask
            >>> model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> stats = sf.NeuronStats(model, num_groups=2, backend="torch")
            >>> with stats.record(torch.arange(10) % 2):
            ...     F.cross_entropy(model(torch.randn(10, 6)), torch.randint(0, 2, (10,))).backward()
            >>> mask = Mask.top_gradient_channels(stats, 0.2, group=1)
            >>> mask.count(bias=False) > 0, sorted(mask.entries)
            (True, ['0.bias', '0.weight', '2.bias', '2.weight'])
        """
        if not isinstance(stats, NeuronStats):
            raise TypeError(f"stats must be a NeuronStats, got {type(stats).__name__}")
        fraction = _check_fraction(fraction)
        if statistic not in GRADIENT_STATISTICS:
            raise ValueError(f"statistic must be one of {GRADIENT_STATISTICS}, got {statistic!r}")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < stats.num_groups):
            raise ValueError(f"group must be None or an int in [0, {stats.num_groups}), got {group!r}")
        model = stats._model_ref()  # NeuronStats holds its model weakly
        if model is None or not stats.layer_names:
            raise ValueError("stats: its model is gone or it was removed; nothing to rank")
        names = stats.layer_names
        if layers is not None:
            if isinstance(layers, str):
                raise ValueError("layers must be a sequence of layer names, not a single string")
            unknown = [n for n in layers if n not in names]
            if unknown:
                raise ValueError(f"layers: {unknown} are not tracked by stats (tracked: {names})")
            names = [n for n in names if n in set(layers)]
            if not names:
                raise ValueError("layers must name at least one tracked layer")
        if statistic == "gradient" and any(n not in stats.group_grad_layers for n in names):
            lacking = [n for n in names if n not in stats.group_grad_layers]
            raise ValueError(f"statistic='gradient' needs group_grad, which stats does not keep for layers {lacking} "
                             "(NeuronStats(track_group_grad=...)); use statistic='grad_sq' or pass layers=")
        counts = stats.group_count if group is None else stats.group_count[group:group + 1]
        if int(counts.sum()) == 0:
            which = "any group" if group is None else f"group {group}"
            raise ValueError(f"stats has recorded no sample of {which}; run a record() block first")
        values = []
        for n in names:
            if statistic == "gradient":
                summed = stats.group_grad[n]  # [G, C, ...]
                grad = summed.sum(0) if group is None else summed[group]
                values.append(grad.double().flatten(1).norm(dim=1).cpu())  # [C]
            else:
                sq = stats.grad_sq_sum[n]  # [G, C] float64
                values.append((sq.sum(0) if group is None else sq[group]).sqrt().cpu())
        flat = torch.cat(values)  # [R]
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("stats holds non-finite gradient statistics")
        k = _how_many(fraction, flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
        modules = dict(model.named_modules())
        table = _parameter_table(model)
        entries, shapes, start = OrderedDict(), {}, 0
        for n, v in zip(names, values):
            rows = chosen[start:start + v.numel()]
            start += v.numel()
            pnames = [f"{n}.weight" if n else "weight"]
            if bias and isinstance(getattr(modules[n], "bias", None), nn.Parameter):
                pnames.append(f"{n}.bias" if n else "bias")
            for p in pnames:
                entries[p] = rows.clone()
                shapes[p] = table[p].shape
        return cls(entries, shapes)

    # ------------------------------------------------------------------ reading
    @property
    def names(self) -> List[str]:
        """Covered parameter names, in order."""
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def is_rows(self, name: str) -> bool:
        """Whether ``name``'s entry selects whole rows (``[C]``; always for 1-D parameters)."""
        return self._entry(name).dim() == 1 and len(self.shapes[name]) >= 1

    def rows(self, name: str) -> Optional[torch.Tensor]:
        """The ``[C]`` bool entry of a row entry, ``None`` for an element entry."""
        entry = self._entry(name)
        return entry if self.is_rows(name) else None

    def element_mask(self, name: str, param: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full-shape bool selection of ``name`` (row entries expanded), a new tensor.

        With ``param`` (the parameter itself) the result is on ``param``'s device and its shape is
        checked; a name without an entry then gives all ``False``.
        """
        if param is not None:
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"param must be a tensor, got {type(param).__name__}")
            if name not in self.entries:
                return torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            if param.shape != self.shapes[name]:
                raise ValueError(f"param for {name!r} has shape {list(param.shape)}, the mask's is {list(self.shapes[name])}")
        entry = self._entry(name)
        shape = self.shapes[name]
        if entry.shape != shape:
            entry = entry.view((-1,) + (1,) * (len(shape) - 1)).expand(shape)
        out = entry.clone()
        return out if param is None else out.to(param.device)

    def to_elements(self) -> "Mask":
        """The same selection with every entry in full shape."""
        return Mask(OrderedDict((n, self.element_mask(n)) for n in self.entries), self.shapes)

    def count(self, bias: bool = True) -> int:
        """Selected elements (a selected row of ``[C, K]`` counts K). ``bias=False`` skips 1-D parameters."""
        total = 0
        for n, entry in self.entries.items():
            shape = self.shapes[n]
            if not bias and len(shape) <= 1:
                continue
            total += _count_of(int(entry.sum()), shape) if entry.shape != shape else int(entry.sum())
        return total

    def covered(self) -> int:
        """Elements of the covered parameters."""
        return sum(math.prod(s) for s in self.shapes.values())

    def fraction(self) -> float:
        """Selected elements over covered elements (0.0 when nothing is covered)."""
        covered = self.covered()
        return self.count() / covered if covered else 0.0

    def units(self) -> List[Tuple[str, int]]:
        """``(layer, channel)`` of every selected row of a row entry on a ``*.weight`` parameter."""
        out = []
        for n, entry in self.entries.items():
            layer, _, leaf = n.rpartition(".")
            if leaf == "weight" and self.is_rows(n):
                out += [(layer, int(c)) for c in entry.nonzero().flatten()]
        return out

    def validate(self, model: nn.Module, arg: str = "mask") -> None:
        """Strict: every name is a parameter of ``model`` of the recorded shape, else ``ValueError``."""
        _check_model(model)
        table = _parameter_table(model)
        for name, shape in self.shapes.items():
            if name not in table:
                raise ValueError(_unknown(name, table, arg))
            if table[name].shape != shape:
                raise ValueError(
                    f"{arg}: {name!r} is for shape {list(shape)}, the model's parameter has shape {list(table[name].shape)}"
                )

    def _entry(self, name: str) -> torch.Tensor:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"the mask has no entry {name!r}; it covers {list(self.entries)}") from None

    # ------------------------------------------------------------------ algebra
    def _combine(self, other: "Mask", op, symbol: str) -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        names = list(self.entries) + [n for n in other.entries if n not in self.entries]
        entries, shapes = OrderedDict(), OrderedDict()
        for n in names:
            shape = self.shapes.get(n, other.shapes.get(n))
            if n in self.shapes and n in other.shapes and self.shapes[n] != other.shapes[n]:
                raise ValueError(
                    f"{symbol}: {n!r} has shape {list(self.shapes[n])} in one mask, {list(other.shapes[n])} in the other"
                )
            a_rows = n not in self.entries or self.is_rows(n)
            b_rows = n not in other.entries or other.is_rows(n)
            if a_rows and b_rows:
                empty = torch.zeros(shape[:1], dtype=torch.bool)
                a, b = self.entries.get(n, empty), other.entries.get(n, empty)
            else:
                empty = torch.zeros(shape, dtype=torch.bool)
                a = self.element_mask(n) if n in self.entries else empty
                b = other.element_mask(n) if n in other.entries else empty
            entries[n], shapes[n] = op(a, b), shape
        return Mask(entries, shapes)

    def __or__(self, other: "Mask") -> "Mask":
        return self._combine(other, torch.logical_or, "|")

    def __and__(self, other: "Mask") -> "Mask":
        return self._combine(other, torch.logical_and, "&")

    def __invert__(self) -> "Mask":
        return Mask(OrderedDict((n, ~e) for n, e in self.entries.items()), self.shapes)

    def __eq__(self, other) -> bool:
        """Same covered parameters and the same selected elements (row and element forms compare equal)."""
        if not isinstance(other, Mask):
            return NotImplemented
        if set(self.entries) != set(other.entries) or any(self.shapes[n] != other.shapes[n] for n in self.shapes):
            return False
        return all(torch.equal(self.element_mask(n), other.element_mask(n)) for n in self.entries)

    __hash__ = None  # mutable tensors inside

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {'rows' if self.is_rows(n) else 'elements'} {int(e.sum())}/{e.numel()}"
                          for n, e in self.entries.items())
        return f"Mask({{{parts}}})"

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the mask to a ``.safetensors`` file (atomically); the shapes go into its metadata.

        Example::

            >>> import os, tempfile, torch.nn as nn
            >>> from spurfast.masks import Mask
            >>> model = nn.Linear(4, 3)
            >>> mask = Mask.from_units(model, [("", 2)])
            >>> path = mask.save(os.path.join(tempfile.mkdtemp(), "mask.safetensors"))
            >>> Mask.load(path, model) == mask
            True
        """
        meta = {"format": _FORMAT, "shapes": {n: list(s) for n, s in self.shapes.items()}, "order": list(self.entries)}
        return save_safetensors_atomic({n: e.contiguous() for n, e in self.entries.items()}, path,
                                       metadata={_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> "Mask":
        """Read a mask written by :meth:`save` (no code is executed); with ``model``, :meth:`validate` it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no mask file at {path!r}")
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError(f"{path!r} is not a spurfast mask (no {_METADATA_KEY!r} metadata)")
            meta = json.loads(raw)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path!r}: mask format {meta.get('format')!r}, this spurfast reads {_FORMAT}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        order = [n for n in meta.get("order", []) if n in tensors] + sorted(n for n in tensors if n not in meta.get("order", []))
        mask = cls(OrderedDict((n, tensors[n]) for n in order), meta["shapes"])
        if model is not None:
            mask.validate(model)
        return mask


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _unknown(name, table: Mapping[str, torch.Tensor], arg: str) -> str:
    names = list(table)
    shown = names if len(names) <= 12 else names[:12] + [f"... {len(names) - 12} more"]
    return f"{arg}: {name!r} is not a parameter of the model (its parameters: {shown})"


# ---------------------------------------------------------------------- the masked forward
def _norm_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # modules in an open block


@contextlib.contextmanager
def masked(model: nn.Module, mask: Mask, *, bn: str = "batch") -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs with ``mask``'s selected entries zeroed, sharing its weights.

    Gradients flow into the model's own Parameters (zero for the selected entries). ``bn``:
    what BatchNorm layers do in the block, see the module docstring (default ``"batch"``:
    batch statistics in train mode, no running-statistics update). Everything is restored on
    exit, also after an exception: the same Parameter objects, no hooks, no attributes left,
    the same ``state_dict``. Masked blocks do not nest over the same module.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.masks import Mask, masked
        >>> model = nn.Linear(3, 2, bias=False)
        >>> mask = Mask.from_units(model, [("", 0)])
        >>> x = torch.ones(1, 3)
        >>> with masked(model, mask):
        ...     out = model(x)
        >>> out[0, 0].item(), bool(out[0, 1] == model(x)[0, 1])
        (0.0, True)
        >>> out.sum().backward()
        >>> model.weight.grad[0].tolist()   # the selected row gets no gradient from the masked branch
        [0.0, 0.0, 0.0]
    """
    _check_model(model)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a spurfast Mask, got {type(mask).__name__}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    mask.validate(model)
    table = _parameter_table(model)
    selected: Dict[int, torch.Tensor] = {}  # id(param) -> bool, broadcastable to the param, on its device
    for name in mask.entries:
        p = table[name]
        shape = mask.shapes[name]
        sel = mask.entries[name]
        if sel.shape != shape:
            sel = sel.view((-1,) + (1,) * (len(shape) - 1)).to(p.device)
        else:  # in the parameter's memory format, so the masked weight keeps it (channels_last)
            sel = torch.zeros_like(p, dtype=torch.bool).copy_(sel)
        if id(p) in selected:  # two names of one tied parameter: either selects
            sel = selected[id(p)] | sel
        selected[id(p)] = sel
    owners: "OrderedDict[nn.Module, List[Tuple[str, nn.Parameter]]]" = OrderedDict()
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in selected:
                owners.setdefault(module, []).append((attr, p))
    norms = _norm_layers(model) if bn != "update" else []
    involved = [model] + [m for m in owners if m is not model] + [m for m in norms if m not in owners and m is not model]
    busy = [type(m).__name__ for m in involved if m in _ACTIVE]
    busy += [type(m).__name__ for m, attrs in owners.items() if any(a in vars(m) for a, _ in attrs)]
    if busy:
        raise RuntimeError(
            f"masked(): modules {sorted(set(busy))} are inside another masked() block or have instance attributes "
            "shadowing their parameters; masked() blocks do not nest over the same module (combine masks with |)"
        )

    shadows: Dict[Tuple[int, str], Tuple[nn.Module, torch.Tensor]] = {}
    handles: List[torch.utils.hooks.RemovableHandle] = []
    saved_modes: Dict[nn.Module, bool] = {}
    zero_like: Dict[int, torch.Tensor] = {}
    depth = [0]  # open calls of the model itself

    def set_masked(module: nn.Module) -> None:
        for attr, p in owners[module]:
            zero = zero_like.get(id(p))
            if zero is None or zero.dtype != p.dtype or zero.device != p.device:
                zero = zero_like[id(p)] = torch.zeros((), dtype=p.dtype, device=p.device)
            value = torch.where(selected[id(p)], zero, p)  # keeps p's memory format; d/dp is 0 where selected
            object.__setattr__(module, attr, value)
            shadows[(id(module), attr)] = (module, value)

    def set_dense(module: nn.Module) -> None:
        for attr, _ in owners[module]:
            entry = shadows.pop((id(module), attr), None)
            if entry is not None and vars(module).get(attr) is entry[1]:  # leave alone what the user put there
                object.__delattr__(module, attr)

    def root_pre_hook(module, args):
        depth[0] += 1
        if depth[0] == 1:
            for m in owners:
                set_masked(m)

    def root_post_hook(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            for m in owners:
                set_dense(m)

    def owner_pre_hook(module, args):
        if depth[0] == 0:  # a submodule called on its own: the model's call did not set it
            set_masked(module)

    def owner_post_hook(module, args, output):
        if depth[0] == 0:
            set_dense(module)

    def bn_pre_hook(module, args):
        if bn == "running":
            saved_modes[module] = module.training
            module.training = False
        elif module.training:
            for attr in _RUNNING:  # batch statistics without running buffers: no update
                object.__setattr__(module, attr, None)

    def bn_post_hook(module, args, output):
        _clear_norm(module, saved_modes)

    for m in involved:
        _ACTIVE[m] = True
    try:
        # the model's own hooks run first and last, around every other hook of the block
        handles.append(model.register_forward_pre_hook(root_pre_hook, prepend=True))
        handles.append(model.register_forward_hook(root_post_hook, always_call=True))
        for module in owners:
            if module is not model:
                handles.append(module.register_forward_pre_hook(owner_pre_hook, prepend=True))
                handles.append(module.register_forward_hook(owner_post_hook, always_call=True))
        for module in norms:
            handles.append(module.register_forward_pre_hook(bn_pre_hook, prepend=True))
            handles.append(module.register_forward_hook(bn_post_hook, always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in owners:
            set_dense(m)
        for module in norms:
            _clear_norm(module, saved_modes)
        for m in involved:
            _ACTIVE.pop(m, None)


def _clear_norm(module: nn.Module, saved_modes: Dict[nn.Module, bool]) -> None:
    for attr in _RUNNING:
        if attr in vars(module) and vars(module)[attr] is None:
            object.__delattr__(module, attr)
    if module in saved_modes:
        module.training = saved_modes.pop(module)


def masked_call(model: nn.Module, mask: Mask, *args, bn: str = "batch", **kwargs):
    """``model(*args, **kwargs)`` inside :func:`masked`; ``bn`` is taken by this function.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.masks import Mask, masked_call
        >>> model = nn.Linear(3, 2)
        >>> every_neuron = Mask.from_units(model, [("", 0), ("", 1)])   # both rows and both biases
        >>> masked_call(model, every_neuron, torch.ones(4, 3)).abs().sum().item()
        0.0
    """
    with masked(model, mask, bn=bn):
        return model(*args, **kwargs)
