"""Deleting a group of training samples by its influence (Yang et al., 2022; Koh et al., 2019).

* :func:`hvp` -- Hessian-vector products of a model's mean training loss over chosen
  parameters, on all the data (exact) or on random minibatches; by double backward or ``torch.func``.
* :func:`lissa` -- ``(H + damping I)^-1 v`` by the LiSSA recursion (Agarwal et al., 2017).
* :func:`group_influence` -- the group-influence deletion ``theta' = theta + 1/((1-p)N) *
  (H + damping I)^-1 sum_{i removed} grad l(z_i)``, the removed set's gradient sum taken from
  :class:`spurfast.NeuronStats` in one pass over the training data.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.attribution.scores import scoring_state
from spurfast.capture import NeuronStats

__all__ = ["HVP_METHODS", "hvp", "lissa", "group_influence"]

#: How :func:`hvp` differentiates twice.
HVP_METHODS = ("double_backward", "func")

Vector = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(v: Vector, arg: str) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return list(v)
    raise TypeError(f"{arg} must be a tensor or a non-empty list/tuple of tensors, got {type(v).__name__}")


def _like(parts: List[torch.Tensor], template: Vector) -> Vector:
    """``parts`` in the structure of ``template``: a tensor, a list or a tuple."""
    if isinstance(template, torch.Tensor):
        return parts[0]
    return tuple(parts) if isinstance(template, tuple) else list(parts)


def _norm(parts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in parts))


def _positive_int(value, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return value


def _nonnegative(value, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_solver(damping, scale, depth, repeats, seed) -> Tuple[float, float]:
    """LiSSA's settings, validated: ``(damping, scale)`` as floats."""
    damping = _nonnegative(damping, "damping")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    _positive_int(depth, "depth")
    _positive_int(repeats, "repeats")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return damping, float(scale)


@contextlib.contextmanager
def _seeded(seed: int, tensors: Sequence[torch.Tensor]):
    """Torch's CPU RNG (and that of the CUDA devices ``tensors`` live on) seeded, the caller's restored after."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:  # not torch.manual_seed: it would also reseed CUDA devices fork_rng does not restore
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


def lissa(
    hvp: Callable[[Vector], Vector],
    v: Vector,
    *,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
    seed: int = 0,
) -> Vector:
    """``(H + damping I)^-1 v`` by the LiSSA recursion, ``H v`` given by ``hvp``.

    ``h_0 = v``, ``h_j = v + h_{j-1} - (hvp(h_{j-1}) + damping h_{j-1}) / scale``; the result is
    ``h_depth / scale``, averaged over ``repeats``. Its fixed point solves ``(H + damping I) h =
    scale v``, so the contract holds exactly, and the error falls by ``1 - (lambda + damping) /
    scale`` per step along each eigenvalue ``lambda`` of ``H``: it converges when ``H + damping I``
    is positive definite and ``scale > (lambda_max + damping) / 2`` (monotonically for ``scale >
    lambda_max + damping``), in about ``scale / (lambda_min + damping)`` steps. Koh & Liang's
    recursion ``h_j = v + (1 - d) h_{j-1} - hvp(h_{j-1}) / s`` instead converges to ``(H + s d
    I)^-1 v``: their ``(d, s)`` is ``damping = s * d`` here.

    ``v`` and ``hvp``'s input and output are a tensor or a list/tuple of tensors (shaped like the
    parameters); the result has ``v``'s structure. Each repeat ``r`` runs with torch's RNG seeded
    from ``seed + r`` inside a fork, so a minibatch ``hvp`` drawing from the global RNG is
    reproducible and the caller's RNG state is untouched. Raises ``FloatingPointError`` when
    the recursion diverges (non-finite, or its norm far beyond the convergent bound ``(j + 1) ||v||``).

    Example:
        >>> H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = lissa(lambda h: H @ h, v, damping=0.1, scale=3.0, depth=300)
        >>> torch.allclose(x, torch.linalg.solve(H + 0.1 * torch.eye(2, dtype=H.dtype), v))
        True
    """
    if not callable(hvp):
        raise TypeError(f"hvp must be a callable v -> H v, got {type(hvp).__name__}")
    v_parts = _as_list(v, "v")
    if not all(t.is_floating_point() for t in v_parts):
        raise ValueError(f"v must hold float tensors, got {[t.dtype for t in v_parts]}")
    damping, scale = _check_solver(damping, scale, depth, repeats, seed)
    v_parts = [t.detach() for t in v_parts]
    v_norm = _norm(v_parts)
    total = [torch.zeros_like(t) for t in v_parts]
    for r in range(repeats):
        with _seeded(seed + r, v_parts):
            h = [t.clone() for t in v_parts]
            for j in range(1, depth + 1):
                hv = _as_list(hvp(_like(h, v)), "hvp's output")
                if len(hv) != len(h) or any(a.shape != b.shape for a, b in zip(hv, h)):
                    raise ValueError(
                        f"hvp's output must be shaped like v, {[list(t.shape) for t in h]}; "
                        f"got {[list(t.shape) for t in hv]}"
                    )
                with torch.no_grad():
                    h = [vi + hi - (hvi.to(hi.dtype) + damping * hi) / scale for vi, hi, hvi in zip(v_parts, h, hv)]
                h_norm = _norm(h)
                if not math.isfinite(h_norm) or h_norm > 100.0 * (j + 1) * max(v_norm, 1e-300):
                    raise FloatingPointError(
                        f"LiSSA diverged at step {j} of repeat {r} (||h|| = {h_norm:.3g}, ||v|| = {v_norm:.3g}): raise "
                        f"scale (now {scale}; it must exceed (lambda_max(H) + damping) / 2), or raise damping "
                        "if the Hessian has negative curvature"
                    )
        for acc, hi in zip(total, h):
            acc.add_(hi, alpha=1.0 / (scale * repeats))
    return _like(total, v)


def _as_pair(data, arg: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [N, ...], targets [N])`` from a tuple of tensors or a dataset with ``.images``/``.labels``."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data[0], data[1]
    elif isinstance(getattr(data, "images", None), torch.Tensor) and isinstance(getattr(data, "labels", None), torch.Tensor):
        if getattr(data, "transform", None) is not None:
            raise ValueError(f"{arg} has a transform; pass (transformed inputs, targets) tensors instead")
        x, y = data.images, data.labels
    else:
        raise TypeError(
            f"{arg} must be an (inputs, targets) tuple of tensors or have .images/.labels; got {type(data).__name__}"
        )
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{arg}: expected inputs [N, ...] and targets [N, ...] with N > 0, got {list(x.shape)} and {list(y.shape)}"
        )
    return x, y


def _resolve_params(model: nn.Module, params) -> List[Tuple[str, torch.nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        by_name, name_of = dict(named), {id(p): n for n, p in named}
        chosen = []
        for item in params:
            name = item if isinstance(item, str) else name_of.get(id(item))
            if name not in by_name:
                raise ValueError(f"params: {item if isinstance(item, str) else 'a tensor'} is not a parameter of the model")
            if not by_name[name].requires_grad:
                raise ValueError(f"params: {name!r} has requires_grad=False; it has no Hessian to take")
            chosen.append((name, by_name[name]))
        if len({n for n, _ in chosen}) != len(chosen):
            raise ValueError("params: each parameter may be named once")
    if not chosen:
        raise ValueError("params: no parameter to differentiate (none requires grad)")
    return chosen


def hvp(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data,
    *,
    params=None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    device=None,
    method: str = "double_backward",
    weight_decay: float = 0.0,
    chunk_size: int = 1024,
) -> Callable[[Vector], Vector]:
    """``f(v) = H v``, ``H`` the Hessian of ``mean_n loss_fn(model(x_n), y_n) + weight_decay/2 ||params||^2``.

    ``data``: ``(inputs, targets)`` tensors or a dataset with ``.images``/``.labels`` (no
    transform). ``loss_fn(outputs, targets)`` is a mean over the batch. ``params``: the
    parameters ``H`` is over, as tensors or names (default: all that require grad); ``v`` is a
    tensor (one parameter) or a list/tuple shaped like them, and ``f`` returns the same
    structure on the parameters' device and dtype. ``batch_size=None``: the exact full-data
    Hessian, deterministic, in chunks of ``chunk_size`` weighted by their size. With
    ``batch_size``, each call uses ``batch_size`` samples drawn without replacement from torch's
    global RNG (``seed=None``: :func:`lissa` seeds it per repeat) or from a private generator
    seeded once with ``seed`` (its stream advances call by call). ``method``: ``"double_backward"``
    (``autograd.grad`` twice) or ``"func"`` (``torch.func.jvp`` of ``torch.func.grad``). The
    model runs in eval mode, its modes and ``.grad`` restored after every call; the regulariser
    adds ``weight_decay * v`` exactly.

    Example:
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
        >>> f = hvp(model, F.cross_entropy, (x, y), params=[model.weight])
        >>> g = hvp(model, F.cross_entropy, (x, y), params=["weight"], method="func")
        >>> v = torch.randn(2, 3, dtype=torch.float64)
        >>> torch.allclose(f(v), g(v))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (outputs, targets) -> mean loss, got {type(loss_fn).__name__}")
    x, y = _as_pair(data, "data")
    named = _resolve_params(model, params)
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    if batch_size is not None:
        batch_size = min(_positive_int(batch_size, "batch_size"), x.shape[0])
    chunk_size = _positive_int(chunk_size, "chunk_size")
    weight_decay = _nonnegative(weight_decay, "weight_decay")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    if device is None:
        device = named[0][1].device
    n = x.shape[0]
    names, tensors = [nm for nm, _ in named], [p for _, p in named]

    def chunk_hvp(xb: torch.Tensor, yb: torch.Tensor, vs: List[torch.Tensor]) -> List[torch.Tensor]:
        xb, yb = xb.to(device), yb.to(device)
        if method == "func":
            def loss_of(*ps):
                out = torch.func.functional_call(model, dict(zip(names, ps)), (xb,), strict=False)
                return loss_fn(out, yb)

            primals = tuple(p.detach() for p in tensors)
            grad_of = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))
            return list(torch.func.jvp(grad_of, primals, tuple(vs))[1])
        with torch.enable_grad():
            loss = loss_fn(model(xb), yb)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            pairs = [(g, vi) for g, vi in zip(grads, vs) if g is not None and g.requires_grad]
            if not pairs:
                return [torch.zeros_like(p) for p in tensors]
            dot = sum((g * vi).sum() for g, vi in pairs)
            hv = torch.autograd.grad(dot, tensors, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, tensors)]

    def f(v: Vector) -> Vector:
        vs = _as_list(v, "v")
        if len(vs) != len(tensors) or any(vi.shape != p.shape for vi, p in zip(vs, tensors)):
            raise ValueError(
                f"v must be shaped like the parameters {[list(p.shape) for p in tensors]}, got {[list(t.shape) for t in vs]}"
            )
        vs = [vi.detach().to(device=p.device, dtype=p.dtype) for vi, p in zip(vs, tensors)]
        total = [torch.zeros_like(p) for p in tensors]
        with scoring_state(model):
            if batch_size is None:
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    weight = (stop - start) / n  # the chunk's share of the full-data mean loss
                    for acc, h in zip(total, chunk_hvp(x[start:stop], y[start:stop], vs)):
                        acc.add_(h, alpha=weight)
            else:
                idx = torch.randperm(n, generator=gen)[:batch_size].to(x.device)
                total = chunk_hvp(x[idx], y[idx], vs)
        if weight_decay:
            total = [h + weight_decay * vi for h, vi in zip(total, vs)]
        return _like(total, v)

    return f


def _removed_mask(removed, n: int) -> torch.Tensor:
    """``[N]`` bool from a bool mask or an index tensor; 0 < count < N."""
    if not isinstance(removed, torch.Tensor) or removed.dim() != 1:
        raise ValueError(f"removed must be a [N] bool tensor or a 1-D index tensor, got {type(removed).__name__}")
    removed = removed.cpu()
    if removed.dtype == torch.bool:
        if removed.shape[0] != n:
            raise ValueError(f"removed: a bool mask must have shape [N] = [{n}], got {list(removed.shape)}")
        mask = removed.clone()
    else:
        if removed.is_floating_point() or removed.is_complex():
            raise ValueError(f"removed must be bool or an integer index tensor, got {removed.dtype}")
        if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= n):
            raise ValueError(
                f"removed: indices must lie in [0, {n}), got range [{int(removed.min())}, {int(removed.max())}]"
            )
        if torch.unique(removed).numel() != removed.numel():
            raise ValueError("removed: indices must be distinct")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[removed.long()] = True
    count = int(mask.sum())
    if not 0 < count < n:
        raise ValueError(f"removed must select between 1 and N - 1 = {n - 1} samples, got {count}")
    return mask


def _group_grad_sums(model, x, y, mask, loss_fn, batch_size, backend, device, layers):
    """``(layer names, {layer: [2, *W.shape]})``: per-sample gradient sums of kept (0) and removed (1) samples."""
    stats = NeuronStats(model, 2, loss_reduction="mean", backend=backend, layers=layers,
                        track_activations=False, track_ablation=False)
    try:
        with scoring_state(model):
            for start in range(0, x.shape[0], batch_size):
                s = slice(start, min(start + batch_size, x.shape[0]))
                group_ids = mask[s].long().to(device)  # [B] int64: 1 = removed
                with stats.record(group_ids):
                    loss_fn(model(x[s].to(device)), y[s].to(device)).backward()
                for p in model.parameters():
                    p.grad = None
        return stats.layer_names, {name: g.clone() for name, g in stats.group_grad.items()}
    finally:
        stats.remove()


def group_influence(
    model: nn.Module,
    train,
    removed: torch.Tensor,
    *,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    damping: float = 0.01,
    scale: float = 25.0,
    depth: int = 1000,
    repeats: int = 10,
    hvp_batch_size: Optional[int] = None,
    batch_size: int = 256,
    seed: int = 0,
    backend: str = "auto",
    device=None,
    inplace: bool = False,
    weight_decay: float = 0.0,
    method: str = "double_backward",
    layers=None,
) -> Tuple[nn.Module, Dict[str, object]]:
    """Delete ``removed`` from ``train`` by its group influence (Yang et al., 2022): returns ``(new_model, info)``.

    ``theta' = theta + 1/((1-p)N) * (H + damping I)^-1 * sum_{i in removed} grad l(z_i)``, ``p``
    the removed fraction and ``N = len(train)``: one Newton step on the objective without the
    removed samples, ``H`` the Hessian of the full training objective (:func:`hvp`, on minibatches
    of ``hvp_batch_size`` or, with ``None``, all the data) inverted by :func:`lissa`
    (``damping``, ``scale``, ``depth``, ``repeats``, ``seed``). The gradient sum over the removed
    set comes from :class:`spurfast.NeuronStats` (``group_grad``, the removed set as group 1) in
    one pass over ``train`` in batches of ``batch_size``; so the update is over the weights
    NeuronStats tracks (Linear/Conv weights, or ``layers``), and biases, norms and every other
    parameter are held fixed. ``weight_decay``: the objective's ``weight_decay/2 ||W||^2`` on those
    weights; it enters ``H`` and adds ``p/(1-p) * weight_decay * W`` to the step, since the
    regulariser keeps its weight while the data term loses the removed samples (0 gives the
    paper's formula). ``loss_fn(outputs, targets)``: a batch mean of per-sample losses (default
    cross-entropy). Everything runs in eval mode.

    ``train``: ``(inputs, targets)`` tensors or a dataset with ``.images``/``.labels`` (no
    transform); ``removed``: ``[N]`` bool or distinct indices. All inputs are checked before
    anything changes. The model is deep-copied (the copy has no ``.grad``) unless ``inplace``;
    either way modes and ``.grad`` end as they were. ``info``: ``p``, ``n_removed``, ``n``,
    ``layers``, ``update_norm``, ``rhs_norm``, ``residual`` (``||(H + damping I) d - rhs|| /
    ||rhs||`` with the full-data H: LiSSA's accuracy), ``grad_norm`` (the full objective's
    gradient norm at ``theta``; the formula assumes a stationary point) and ``seconds``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 2).double()
        >>> x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 2, (40,))
        >>> new, info = group_influence(model, (x, y), torch.arange(4), damping=0.1, scale=2.0, depth=50, repeats=1)
        >>> info["n_removed"], info["p"], torch.equal(new.bias, model.bias), torch.equal(new.weight, model.weight)
        (4, 0.1, True, False)
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    x, y = _as_pair(train, "train")
    n = x.shape[0]
    mask = _removed_mask(removed, n)  # [N] bool
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (outputs, targets) -> mean loss, got {type(loss_fn).__name__}")
    _check_solver(damping, scale, depth, repeats, seed)
    _positive_int(batch_size, "batch_size")
    if hvp_batch_size is not None:
        _positive_int(hvp_batch_size, "hvp_batch_size")
    weight_decay = _nonnegative(weight_decay, "weight_decay")
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    # Layer/backend errors surface here, before the copy; names, since a module given in layers
    # is not a submodule of the copy.
    check = NeuronStats(model, 2, backend=backend, layers=layers, track_group_grad=False,
                        track_activations=False, track_ablation=False)
    layer_names = check.layer_names
    check.remove()

    target = model if inplace else copy.deepcopy(model)
    if device is None:
        device = next(target.parameters()).device
    with scoring_state(target):
        names, sums = _group_grad_sums(target, x, y, mask, loss_fn, batch_size, backend, device, layer_names)
        modules = dict(target.named_modules())
        weights = [modules[name].weight for name in names]
        n_removed = int(mask.sum())
        p = n_removed / n
        rhs = []  # [*W.shape] per layer
        for w, name in zip(weights, names):
            step = sums[name][1].to(w.dtype) / ((1 - p) * n)
            if weight_decay:
                step = step + (p / (1 - p)) * weight_decay * w.detach()
            rhs.append(step)
        full_grad = [sums[name].sum(0).to(w.dtype) / n + weight_decay * w.detach() for w, name in zip(weights, names)]
        common = dict(params=weights, device=device, method=method, weight_decay=weight_decay, chunk_size=batch_size)
        stochastic = hvp(target, loss_fn, (x, y), batch_size=hvp_batch_size, **common)
        delta = lissa(stochastic, rhs, damping=damping, scale=scale, depth=depth, repeats=repeats, seed=seed)
        exact = stochastic if hvp_batch_size is None else hvp(target, loss_fn, (x, y), **common)
        residual = [hd + damping * d - r for hd, d, r in zip(exact(delta), delta, rhs)]
        rhs_norm = _norm(rhs)
        with torch.no_grad():
            for w, d in zip(weights, delta):
                w.add_(d)
    info: Dict[str, object] = {
        "p": p,
        "n_removed": n_removed,
        "n": n,
        "layers": names,
        "update_norm": _norm(delta),
        "rhs_norm": rhs_norm,
        "residual": _norm(residual) / rhs_norm if rhs_norm > 0 else 0.0,
        "grad_norm": _norm(full_grad),
        "seconds": time.perf_counter() - started,
    }
    return target, info
