"""Masked optimizers: SGD, Adam and AdamW whose steps leave chosen rows of the parameters, and
all of those rows' optimizer state, bit-identical.

:class:`MaskedSGD`, :class:`MaskedAdam` and :class:`MaskedAdamW` take the arguments of
``torch.optim.SGD``/``Adam``/``AdamW`` and, with no mask set, give their results (to float32
rounding; the fused kernels do the same operations in the same order). On top:

* ``opt.freeze(mask)``: the mask's *selected* entries are not touched by :meth:`step`: their
  parameters, gradients' effect, momentum buffer / ``exp_avg`` / ``exp_avg_sq`` /
  ``max_exp_avg_sq`` and step counts stay bit-identical, and weight decay does not reach them;
* ``opt.update_only(mask)``: only the selected entries are updated (parameters without an entry
  are frozen whole);
* ``opt.clear_mask()``: every entry is updated again. Each call replaces the previous mask;
  masks may change between any two steps.

A mask is a :class:`spurfast.masks.Mask` or a plain dict, keyed by parameter names (the
optimizer knows them when built from ``model.named_parameters()``, or pass ``model=``) or by
the parameter tensors themselves, with bool values ``[C]`` (rows: a neuron / output channel
``W[c, ...]``; for a 1-D parameter, its elements) or of the parameter's full shape (elements).
Everything is checked before anything changes: an unknown name, a parameter the optimizer does
not hold, a wrong shape or dtype raises ``ValueError`` naming it.

Step counts are kept per row: ``state["step"]`` is a float32 tensor ``[C]`` counting the
updates of each row, so a row frozen for k steps and released gets Adam's bias correction of
its own number of updates -- exactly what ``torch.optim.Adam`` would do on that row's history
with the frozen steps left out. (SGD keeps them too: a row's momentum buffer starts as its
first gradient, as torch's does.) An element mask (an entry of full shape that is not constant
along rows) turns that parameter's step counts into per-element ones, ``state["step"]`` of the
parameter's shape, from then on; such parameters are stepped by the plain-torch reference,
the others by the fused kernels (``backend="auto"``); a fused ``backend`` named explicitly
rejects element masks in :meth:`freeze` / :meth:`update_only`.

State: bfloat16/float16 parameters keep float32 state (float64 ones float64). The current mask
is part of the state (``state["active"]``: the rows, or elements, that step updates), so
:meth:`state_dict` / :meth:`load_state_dict` round-trip it with everything else, also through
``spurfast.train`` checkpoints. ``load_state_dict`` also takes the state of
``torch.optim.SGD``/``Adam``/``AdamW`` (a scalar ``step`` becomes every row's count).

Not supported (clear errors): sparse gradients, complex parameters, ``capturable=True``,
``differentiable=True``. ``foreach`` and ``fused`` are accepted and ignored: the step is always
one fused call per parameter group and dtype, chosen by ``backend`` (``"auto"``, ``"cpp"``,
``"triton"``, ``"cuda"`` or ``"torch"``; see :mod:`spurfast.ops.masked_step`).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from spurfast.ops.masked_step import (
    BACKENDS,
    masked_adam_step,
    masked_sgd_step,
    row_shape,
    state_dtype,
)

FUSED_BACKENDS = ("cpp", "triton", "cuda")
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _is_named(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


class _MaskedOptimizer(torch.optim.Optimizer):
    """Parameter names, masks, state casting and ``state_dict`` for the masked optimizers."""

    _STATE_KEYS: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; ``params`` may also be ``(name, tensor)`` pairs."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs; use a list instead")
        else:
            params = list(params)
        group = dict(param_group)
        if params and all(_is_named(item) for item in params):
            group["param_names"] = [name for name, _ in params]
            params = [tensor for _, tensor in params]
        elif any(_is_named(item) for item in params):
            raise TypeError("params must be all tensors or all (name, tensor) pairs, not a mix")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
            if p.dtype not in _PARAM_DTYPES:
                raise ValueError(f"params[{i}] has dtype {p.dtype}; {type(self).__name__} steps float32/float64/"
                                 "bfloat16/float16 parameters (complex and integer ones are not supported)")
        group["params"] = params
        backend = group.get("backend", self.defaults.get("backend", "auto"))
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().add_param_group(group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)

    def _group_defaults(self) -> Dict[str, Any]:
        return {"backend": "auto", "maximize": False, "foreach": None, "fused": None, "differentiable": False}

    def _held(self) -> Dict[int, Tuple[torch.Tensor, dict, Optional[str]]]:
        """``{id(param): (param, group, name or None)}`` of every parameter, in group order."""
        held = {}
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                held[id(p)] = (p, group, name)
        return held

    # ------------------------------------------------------------------ masks
    def freeze(self, mask, model: Optional[nn.Module] = None) -> None:
        """Keep the selected entries of ``mask`` (and all their state) unchanged by :meth:`step`.

        Args:
            mask: a :class:`spurfast.masks.Mask`, or a dict ``{name or parameter: bool tensor}``;
                each value ``[C]`` (rows) or the parameter's shape (elements). True = frozen.
            model: the module whose ``named_parameters()`` names the mask uses, when the
                optimizer was not built from named parameters.

        Replaces any previous mask. Raises ``ValueError`` (nothing changed) for an unknown
        name, a parameter this optimizer does not hold, or a wrong shape or dtype.

        Example::

            >>> import torch, torch.nn as nn
            >>> from spurfast.optim import MaskedAdam
            >>> model = nn.Linear(2, 3)
            >>> opt = MaskedAdam(model.named_parameters(), lr=0.1)
            >>> opt.freeze({"weight": torch.tensor([True, False, False]), "bias": torch.tensor([True, False, False])})
            >>> before = model.weight.detach().clone()
            >>> model(torch.randn(4, 2)).sum().backward()
            >>> opt.step()
            >>> torch.equal(model.weight[0], before[0]), torch.equal(model.weight[1], before[1])
            (True, False)
        """
        self._set_mask(mask, model, update_selected=False)

    def update_only(self, mask, model: Optional[nn.Module] = None) -> None:
        """Update only the selected entries of ``mask``; every other entry (and every parameter
        without an entry) keeps its value and state. Arguments as in :meth:`freeze`.

        Example::

            >>> import torch, torch.nn as nn
            >>> from spurfast.optim import MaskedSGD
            >>> model = nn.Linear(2, 2)
            >>> opt = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9)
            >>> opt.update_only({"weight": torch.tensor([False, True])})
            >>> bias = model.bias.detach().clone()
            >>> model(torch.randn(3, 2)).sum().backward()
            >>> opt.step()
            >>> torch.equal(model.bias, bias), opt.state[model.weight]["step"].tolist()
            (True, [0.0, 1.0])
        """
        self._set_mask(mask, model, update_selected=True)

    def clear_mask(self) -> None:
        """Update every entry again (the optimizer state is kept)."""
        for p in list(self.state):
            state = self.state[p]
            state.pop("active", None)
            if not state:
                del self.state[p]

    def update_mask(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """What the next :meth:`step` updates of ``param``: a bool ``[C]`` (rows) or full-shape
        tensor (a copy), or None for all of it."""
        if id(param) not in self._held():
            raise ValueError("param is not a parameter of this optimizer")
        active = self.state[param].get("active") if param in self.state else None
        return None if active is None else active.clone()

    def _mask_items(self, mask, model: Optional[nn.Module], held) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        """``[(label, param, selection)]`` from a Mask or a dict, every key resolved and checked."""
        if isinstance(mask, Mapping):
            entries, shapes = mask, None
        elif hasattr(mask, "entries") and hasattr(mask, "shapes"):
            entries, shapes = mask.entries, mask.shapes
        else:
            raise TypeError(f"mask must be a spurfast.masks.Mask or a dict of bool tensors, got {type(mask).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        by_name: Optional[Dict[str, torch.Tensor]] = None
        if model is not None:
            by_name = dict(model.named_parameters())
        else:
            named = {name: p for p, _, name in held.values() if name is not None}
            if named:
                by_name = named
        items, seen = [], set()
        for key, selection in entries.items():
            if isinstance(key, str):
                if by_name is None:
                    raise ValueError(f"mask entry {key!r} is keyed by a parameter name, but this optimizer was not "
                                     "built from named_parameters(); pass model= (or key the mask by tensors)")
                if key not in by_name:
                    known = ", ".join(list(by_name)[:8]) + (" ..." if len(by_name) > 8 else "")
                    raise ValueError(f"mask entry {key!r} is not a parameter name of the "
                                     f"{'model' if model is not None else 'optimizer'} (known: {known})")
                p, label = by_name[key], repr(key)
            elif isinstance(key, torch.Tensor):
                p, label = key, f"the parameter of shape {list(key.shape)}"
            else:
                raise TypeError(f"mask keys must be parameter names or tensors, got {type(key).__name__}")
            if id(p) not in held:
                raise ValueError(f"mask entry {label} is not a parameter of this optimizer")
            if id(p) in seen:
                raise ValueError(f"mask entry {label}: the parameter has more than one entry")
            seen.add(id(p))
            if shapes is not None and isinstance(key, str) and tuple(shapes[key]) != tuple(p.shape):
                raise ValueError(f"mask entry {label} is for shape {list(shapes[key])}, the parameter has shape "
                                 f"{list(p.shape)}")
            items.append((label, p, self._checked_selection(label, p, held[id(p)][1], selection)))
        return items

    def _checked_selection(self, label: str, p: torch.Tensor, group: dict, selection) -> torch.Tensor:
        """The selection as a CPU bool tensor: ``[C]`` when it is constant along rows, else full shape."""
        if not isinstance(selection, torch.Tensor) or selection.dtype != torch.bool:
            what = selection.dtype if isinstance(selection, torch.Tensor) else type(selection).__name__
            raise ValueError(f"mask entry {label} must be a bool tensor, got {what}")
        rows = row_shape(p)
        if tuple(selection.shape) not in (rows, tuple(p.shape)):
            raise ValueError(f"mask entry {label} has shape {list(selection.shape)}; expected {list(rows)} (rows) or "
                             f"{list(p.shape)} (elements) for a parameter of shape {list(p.shape)}")
        selection = selection.detach().to("cpu")
        if tuple(selection.shape) != rows:
            flat = selection.reshape(rows[0], -1)
            if flat.shape[1] == 0:
                selection = torch.zeros(rows, dtype=torch.bool)
            elif bool((flat.all(1) | ~flat.any(1)).all()):  # constant along every row: a row mask
                selection = flat[:, 0].clone()
            elif group.get("backend", "auto") in FUSED_BACKENDS:
                raise ValueError(f"mask entry {label} is an element mask (not constant along rows), which "
                                 f"backend={group['backend']!r} does not take; use backend='auto' or 'torch'")
        return selection

    def _set_mask(self, mask, model, update_selected: bool) -> None:
        held = self._held()
        selected = {id(p): sel for _, p, sel in self._mask_items(mask, model, held)}
        active: Dict[int, Optional[torch.Tensor]] = {}
        for pid, (p, _, _) in held.items():
            sel = selected.get(pid)
            if update_selected:
                act = sel if sel is not None else torch.zeros(row_shape(p), dtype=torch.bool)
            else:
                act = None if sel is None else ~sel
            active[pid] = None if act is None or bool(act.all()) else act.to(p.device)
        # Everything is checked: commit.
        for pid, (p, _, _) in held.items():
            if active[pid] is None:
                if p in self.state:
                    self.state[p].pop("active", None)
                    if not self.state[p]:
                        del self.state[p]
            else:
                self.state[p]["active"] = active[pid]

    # ------------------------------------------------------------------ state
    def _new_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        state["step"] = torch.zeros(row_shape(p), dtype=torch.float32, device=p.device)
        for key in self._state_keys(group):
            state[key] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)

    def _state_keys(self, group: dict) -> Tuple[str, ...]:
        return self._STATE_KEYS

    def _gather(self, group: dict):
        """``(params, grads, states, steps, active)`` of the group's parameters that have a gradient."""
        params, grads, steps, active = [], [], [], []
        keys = self._state_keys(group)
        states: Dict[str, List[torch.Tensor]] = {key: [] for key in keys}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                self._new_state(p, group, state)
            for key in keys:
                if key not in state:  # e.g. amsgrad switched on after a load
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)
                states[key].append(state[key])
            act = state.get("active")
            if act is not None and tuple(act.shape) != row_shape(p) and tuple(state["step"].shape) == row_shape(p):
                # The first element mask of this parameter: per-element step counts from now on.
                state["step"] = state["step"].view(row_shape(p) + (1,) * (p.dim() - 1)).expand(p.shape).clone()
            params.append(p)
            grads.append(p.grad)
            steps.append(state["step"])
            active.append(act)
        return params, grads, states, steps, active

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; per-row ``step`` tensors and the mask (``active``) included."""
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one of ``torch.optim.SGD``/``Adam``/``AdamW``).

        Checks everything before it changes anything: the group sizes, the parameter names
        where both sides have them, every state tensor's shape. Tensors are copied onto the
        parameters' devices, in the state dtype (float32 for bfloat16/float16 parameters).
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, the optimizer {len(self.param_groups)}")
        id_map: Dict[Any, Tuple[torch.Tensor, dict]] = {}
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict's parameter group {g} has {len(saved['params'])} parameters, the "
                                 f"optimizer's {len(group['params'])}")
            names, saved_names = group.get("param_names"), saved.get("param_names")
            if names is not None and saved_names is not None and list(names) != list(saved_names):
                bad = next(i for i, (a, b) in enumerate(zip(names, saved_names)) if a != b)
                raise ValueError(f"state_dict's parameter group {g} names parameter {bad} {saved_names[bad]!r}, "
                                 f"the optimizer {names[bad]!r}")
            for saved_id, p in zip(saved["params"], group["params"]):
                id_map[saved_id] = (p, group)
        new_state: Dict[torch.Tensor, dict] = {}
        for saved_id, values in state_dict["state"].items():
            key = saved_id if saved_id in id_map else (int(saved_id) if str(saved_id).isdigit() else saved_id)
            if key not in id_map:
                raise ValueError(f"state_dict has state for parameter {saved_id!r}, which no parameter group lists")
            p, group = id_map[key]
            new_state[p] = self._loaded_state(p, group, values, f"state[{saved_id!r}]")
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new_group = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("params", "param_names")}
            new_group = {**{k: v for k, v in group.items() if k not in new_group}, **new_group}
            new_group["params"] = group["params"]
            new_groups.append(new_group)
        for new_group in new_groups:
            if new_group.get("backend", "auto") not in BACKENDS:
                raise ValueError(f"state_dict's param group has backend {new_group['backend']!r}; expected one of "
                                 f"{BACKENDS}")
        self.__setstate__({"state": defaultdict(dict, new_state), "param_groups": new_groups})

    def _loaded_state(self, p: torch.Tensor, group: dict, values, label: str) -> dict:
        if not isinstance(values, Mapping):
            raise ValueError(f"{label} must be a dict, got {type(values).__name__}")
        out: Dict[str, Any] = {}
        rows = row_shape(p)
        for key, value in values.items():
            if key == "step":
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if tuple(value.shape) not in (rows, tuple(p.shape)):
                        raise ValueError(f"{label}['step'] has shape {list(value.shape)}; expected {list(rows)} "
                                         f"(per row), {list(p.shape)} (per element) or a scalar")
                    out["step"] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                else:  # torch.optim's scalar step: every row has had that many updates
                    count = float(value.item() if isinstance(value, torch.Tensor) else value)
                    out["step"] = torch.full(rows, count, dtype=torch.float32, device=p.device)
            elif key == "active":
                if (not isinstance(value, torch.Tensor) or value.dtype != torch.bool
                        or tuple(value.shape) not in (rows, tuple(p.shape))):
                    raise ValueError(f"{label}['active'] must be a bool tensor of shape {list(rows)} or {list(p.shape)}")
                out["active"] = value.detach().to(device=p.device, copy=True)
            elif key in self._STATE_KEYS or key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if value is None:
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"{label}[{key!r}] has shape {shape}, the parameter {list(p.shape)}")
                out[key] = value.detach().to(device=p.device, dtype=state_dtype(p.dtype), copy=True)
                if not p.is_contiguous() and out[key].stride() != p.stride():
                    out[key] = torch.empty_like(p, dtype=out[key].dtype).copy_(out[key])
            else:
                out[key] = copy.deepcopy(value)
        if "step" not in out and any(k in out for k in self._STATE_KEYS):
            if "momentum_buffer" in out:  # torch.optim.SGD keeps no step: every row has had its first update
                out["step"] = torch.ones(rows, dtype=torch.float32, device=p.device)
            else:
                raise ValueError(f"{label} has optimizer state but no 'step'")
        return out


class MaskedSGD(_MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) with row masks.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        foreach, fused: accepted for compatibility and ignored (the step is always fused).
        differentiable: only False.
        backend: ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"torch"`` (the reference).

    State per parameter: ``step`` (``[C]`` float32, updates per row) and, with momentum,
    ``momentum_buffer``. See the module docstring for masks.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.optim import MaskedSGD
        >>> model = nn.Linear(3, 2)
        >>> opt = MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> opt.freeze({"weight": torch.tensor([False, True])})
        >>> frozen = model.weight[1].detach().clone()
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(5, 3)).pow(2).sum().backward()
        ...     opt.step()
        >>> torch.equal(model.weight[1], frozen), opt.state[model.weight]["step"].tolist()
        (True, [3.0, 0.0])
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
    ):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("differentiable=True is not supported by the masked optimizers")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=False, fused=fused, backend=backend)
        super().__init__(params, defaults)

    def _state_keys(self, group: dict) -> Tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    _STATE_KEYS = ("momentum_buffer",)

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step of every parameter with a gradient (only the rows the mask leaves active)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states, steps, active = self._gather(group)
            if not params:
                continue
            masked_sgd_step(params, grads, states.get("momentum_buffer", []), steps, active, lr=float(group["lr"]),
                            momentum=group["momentum"], dampening=group["dampening"],
                            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                            maximize=group["maximize"], backend=group["backend"], check_inputs=False)
        return loss


class MaskedAdam(_MaskedOptimizer):
    """``torch.optim.Adam`` (weight decay, AMSGrad, maximize; ``decoupled_weight_decay=True`` is
    AdamW) with row masks and per-row step counts.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in ``torch.optim.Adam``.
        foreach, fused: accepted for compatibility and ignored (the step is always fused).
        capturable, differentiable: only False.
        backend: ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"torch"`` (the reference).

    State per parameter: ``step`` (``[C]`` float32, updates per row; Adam's bias correction of a
    row uses its own count), ``exp_avg``, ``exp_avg_sq`` and, with AMSGrad, ``max_exp_avg_sq``.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.optim import MaskedAdam
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(4, 3)
        >>> opt = MaskedAdam(model.named_parameters(), lr=1e-2)
        >>> for step in range(4):
        ...     if step == 2:
        ...         opt.freeze({"weight": torch.tensor([True, False, False])})
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step()
        >>> opt.state[model.weight]["step"].tolist(), opt.state[model.bias]["step"].tolist()
        ([2.0, 4.0, 4.0], [4.0, 4.0, 4.0])
    """

    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _DECOUPLED_DEFAULT = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
    ):
        self._init(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable, fused,
                   decoupled_weight_decay, backend)

    def _init(self, params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable,
              fused, decoupled_weight_decay, backend) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError("capturable=True is not supported by the masked optimizers (no CUDA-graph capture)")
        if differentiable:
            raise ValueError("differentiable=True is not supported by the masked optimizers")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=False, differentiable=False,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay, backend=backend)
        super().__init__(params, defaults)

    def _group_defaults(self) -> Dict[str, Any]:
        return dict(super()._group_defaults(), amsgrad=False, capturable=False,
                    decoupled_weight_decay=self._DECOUPLED_DEFAULT)

    def _state_keys(self, group: dict) -> Tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam/AdamW step of every parameter with a gradient (only the rows the mask leaves active)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states, steps, active = self._gather(group)
            if not params:
                continue
            masked_adam_step(params, grads, states["exp_avg"], states["exp_avg_sq"], steps, active,
                             max_exp_avg_sqs=states.get("max_exp_avg_sq"), lr=float(group["lr"]),
                             betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                             decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
                             maximize=group["maximize"], backend=group["backend"], check_inputs=False)
        return loss


class MaskedAdamW(MaskedAdam):
    """``torch.optim.AdamW``: :class:`MaskedAdam` with decoupled weight decay (default 1e-2).
    Frozen rows get no weight decay either.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.optim import MaskedAdamW
        >>> model = nn.Linear(3, 4)
        >>> opt = MaskedAdamW(model.named_parameters(), lr=1e-3)
        >>> opt.update_only({"weight": torch.tensor([True, True, False, False])})
        >>> before = model.weight.detach().clone()
        >>> model(torch.randn(2, 3)).sum().backward()
        >>> opt.step()
        >>> [torch.equal(model.weight[c], before[c]) for c in range(4)]
        [False, False, True, True]
    """

    _DECOUPLED_DEFAULT = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
    ):
        self._init(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable, fused,
                   True, backend)


__all__ = ["MaskedAdam", "MaskedAdamW", "MaskedSGD"]
