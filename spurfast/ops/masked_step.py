"""Masked optimizer steps: one fused multi-tensor Adam/AdamW or SGD step over a list of
parameters that updates only their *active* rows and leaves every other row, and all of its
optimizer state, bit-identical (the masked rows are not even loaded).

A parameter ``p`` of shape ``[C, ...]`` is C rows (output channels / neurons ``p[c]``); a 1-D
parameter (a bias, a norm scale) has rows of one element, a 0-d one is a single row. Per tensor:

* ``params[i]``  ``[C, ...]`` float32/float64/bfloat16/float16, updated in place;
* ``grads[i]``   same shape and dtype;
* state (``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs``; ``momentum_buffers``), same shape,
  float32 (float64 for float64 parameters): bfloat16/float16 parameters keep float32 state;
* ``steps[i]``   ``[C]`` float32: how many updates each row has had; the active rows' counts are
  incremented, and Adam's bias correction of a row uses its own count, so that a row frozen for
  k steps and then released continues as if those k steps had not happened;
* ``active[i]``  ``[C]`` bool (True: update the row), or None for every row.

The arithmetic is torch.optim's single-tensor path operation by operation (``lerp_``,
``mul_``/``addcmul_``, ``sqrt() / bias_correction2_sqrt + eps``, ``addcdiv_``, the bias corrections
in double), so with every row active the result matches ``torch.optim.Adam``/``AdamW``/``SGD``
to rounding. SGD's momentum buffer of a row starts, as torch's does, as the row's first
(weight-decayed) gradient, at the row's first update.

Backends: ``torch`` (:func:`masked_adam_step_reference` / :func:`masked_sgd_step_reference`,
plain torch ops, which also take element masks and per-element step counts of the parameter's
full shape), ``cpp`` (``csrc/masked_step.cpp``: OpenMP over row chunks, SSE2 loops, masked rows
skipped), ``triton`` (``spurfast/ops/_triton/masked_step.py``: one launch over all tensors, a
program per block of elements that returns at once when its rows are all masked) and ``cuda``
(``csrc/cuda/masked_step.cu``, compiled only with a CUDA torch and toolkit). The fused backends
take row masks and row step counts of dense tensors; under ``backend="auto"`` a tensor they
cannot take (an element mask, a non-dense layout) goes through the reference instead, and a
named fused backend raises for it. Tensors are grouped by (device, dtype), one fused call each.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from spurfast import _extension
from spurfast._extension import require_extension, warn_once
from spurfast.ops._common import resolve_backend, triton_importable, triton_module
from spurfast.ops._library import lib, register_fake

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

lib.define(
    "masked_adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
    " Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor?[] active, float lr, float beta1, float beta2,"
    " float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize) -> ()"
)
lib.define(
    "masked_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps,"
    " Tensor?[] active, float lr, float momentum, float dampening, float weight_decay, bool nesterov,"
    " bool maximize) -> ()"
)


def _adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, active, lr, beta1, beta2, eps,
              weight_decay, decoupled_weight_decay, amsgrad, maximize):
    require_extension("cpp").masked_adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, list(active), lr, beta1, beta2, eps,
        weight_decay, decoupled_weight_decay, amsgrad, maximize)


def _adam_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, active, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, amsgrad, maximize):
    triton_module("masked_step").masked_adam_step_triton(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, list(active), lr, beta1, beta2, eps,
        weight_decay, decoupled_weight_decay, amsgrad, maximize)


def _sgd_cpu(params, grads, momentum_buffers, steps, active, lr, momentum, dampening, weight_decay, nesterov,
             maximize):
    require_extension("cpp").masked_sgd_step(
        params, grads, momentum_buffers, steps, list(active), lr, momentum, dampening, weight_decay, nesterov,
        maximize)


def _sgd_triton(params, grads, momentum_buffers, steps, active, lr, momentum, dampening, weight_decay, nesterov,
                maximize):
    triton_module("masked_step").masked_sgd_step_triton(
        params, grads, momentum_buffers, steps, list(active), lr, momentum, dampening, weight_decay, nesterov,
        maximize)


lib.impl("masked_adam_step", _adam_cpu, "CPU")
lib.impl("masked_adam_step", _adam_triton, "CUDA")
lib.impl("masked_sgd_step", _sgd_cpu, "CPU")
lib.impl("masked_sgd_step", _sgd_triton, "CUDA")


@register_fake("spurfast::masked_adam_step")
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, active, lr, beta1, beta2, eps,
               weight_decay, decoupled_weight_decay, amsgrad, maximize):
    return None


@register_fake("spurfast::masked_sgd_step")
def _sgd_fake(params, grads, momentum_buffers, steps, active, lr, momentum, dampening, weight_decay, nesterov,
              maximize):
    return None


# ------------------------------------------------------------------------------ helpers
def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a parameter's optimizer state: float64 for float64, else float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def row_shape(param: torch.Tensor) -> Tuple[int, ...]:
    """The shape of a row mask or row step count of ``param``: ``(C,)``, or ``()`` for a 0-d parameter."""
    return tuple(param.shape[:1])


def _per_row(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A row tensor ``[C]`` viewed as ``[C, 1, ...]`` to broadcast against ``param``; full-shape as is."""
    if x.dim() == 1 and param.dim() > 1:
        return x.view((x.shape[0],) + (1,) * (param.dim() - 1))
    return x


def _dense_rows(t: torch.Tensor) -> bool:
    """Each row of ``t`` is one contiguous block and the rows are back to back (contiguous or
    channels-last conv weights): the fused kernels see ``t`` as a flat ``[C, D]`` buffer."""
    if t.dim() <= 1 or t.is_contiguous():
        return t.is_contiguous()
    expected = 1  # non-overlapping and dense: the strides, sorted, are the running products of the sizes
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _is_row(x: Optional[torch.Tensor], param: torch.Tensor) -> bool:
    return x is None or tuple(x.shape) == row_shape(param)


def _fused_problem(param, grad, states, step, act) -> Optional[str]:
    """Why a fused kernel cannot take this tensor, or None."""
    rows = param.shape[:1]
    if not (param.is_contiguous() and grad.is_contiguous() and all(s.is_contiguous() for s in states)):
        if not _dense_rows(param):
            return "the parameter is not dense (rows must be contiguous blocks)"
        if grad.stride() != param.stride():
            return "the gradient's layout differs from the parameter's"
        if any(s.stride() != param.stride() for s in states):
            return "the optimizer state's layout differs from the parameter's"
    if act is not None and (act.shape != rows or not act.is_contiguous()):
        return "its mask is an element mask, not a row mask"
    if step.shape != rows or not step.is_contiguous():
        return "its step counts are per element, not per row"
    return None


def _check_lists(params, grads, states: Dict[str, Sequence[torch.Tensor]], steps, active):
    """Validate the tensor lists once; returns ``active`` as a list (None entries: every row)."""
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError("params must be a list of tensors")
    n = len(params)
    if active is None:
        active = [None] * n
    lists = dict(grads=grads, steps=steps, active=active, **states)
    for name, values in lists.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"{name} must be a list of {n} tensors (one per parameter), got "
                             f"{type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}")
    for i, p in enumerate(params):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}] must be float32/float64/bfloat16/float16, got {p.dtype}")
        g = grads[i]
        if not isinstance(g, torch.Tensor) or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"grads[{i}] must be a {p.dtype} tensor of shape {list(p.shape)} on {p.device}, got "
                             + (f"{g.dtype} {list(g.shape)} on {g.device}" if isinstance(g, torch.Tensor)
                                else type(g).__name__))
        if g.is_sparse:
            raise ValueError(f"grads[{i}] is sparse; masked steps take dense gradients")
        sdtype = state_dtype(p.dtype)
        for name, values in states.items():
            s = values[i]
            if not isinstance(s, torch.Tensor) or s.shape != p.shape or s.dtype != sdtype or s.device != p.device:
                raise ValueError(f"{name}[{i}] must be a {sdtype} tensor of shape {list(p.shape)} on {p.device}, got "
                                 + (f"{s.dtype} {list(s.shape)} on {s.device}" if isinstance(s, torch.Tensor)
                                    else type(s).__name__))
        st = steps[i]
        if (not isinstance(st, torch.Tensor) or st.dtype != torch.float32 or st.device != p.device
                or tuple(st.shape) not in (row_shape(p), tuple(p.shape))):
            raise ValueError(f"steps[{i}] must be a float32 tensor on {p.device} of shape {list(row_shape(p))} "
                             f"(per row) or {list(p.shape)} (per element)")
        a = active[i]
        if a is not None and (not isinstance(a, torch.Tensor) or a.dtype != torch.bool or a.device != p.device
                              or tuple(a.shape) not in (row_shape(p), tuple(p.shape))):
            raise ValueError(f"active[{i}] must be None or a bool tensor on {p.device} of shape "
                             f"{list(row_shape(p))} (rows) or {list(p.shape)} (elements)")
        if a is not None and not _is_row(a, p) and _is_row(st, p):
            raise ValueError(f"active[{i}] is an element mask, which needs per-element steps[{i}] of shape "
                             f"{list(p.shape)}, got {list(st.shape)}")
    return list(active)


def _cuda_ext():
    ext = require_extension("cuda")
    if not ext.with_cuda():
        skipped = _extension._state.get("cuda_skipped") or "no CUDA sources"
        raise RuntimeError(f"backend='cuda' needs the C++ extension built with its CUDA sources, which it was not: "
                           f"{skipped}; use backend='triton' or backend='torch'")
    return ext


def resolve_step_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a masked step of ``dtype`` tensors on ``device``.

    ``auto``: ``cpp`` on CPU, ``triton`` on CUDA (else the ``cuda`` kernel if it was compiled;
    float64 on CUDA: ``cuda`` or ``torch``), falling back to ``torch`` with one warning. A named
    backend that cannot run raises with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors, got tensors on {device}")
        _cuda_ext()
        return "cuda"
    if backend != "auto":
        return resolve_backend(backend, device, dtype)
    if device.type == "cpu":
        if _extension.load_extension() is not None:
            return "cpp"
        warn_once("masked-step-cpu", f"spurfast: C++ extension unavailable ({_extension._C_error}); masked "
                                     "optimizer steps fall back to the plain-torch reference (several passes).")
        return "torch"
    if device.type == "cuda":
        if dtype != torch.float64 and triton_importable():
            return "triton"
        ext = _extension.load_extension()
        if ext is not None and ext.with_cuda():
            return "cuda"
    warn_once(f"masked-step-{device.type}-{dtype}", f"spurfast: no fused masked step for {dtype} tensors on "
                                                    f"{device.type} here; using the plain-torch reference.")
    return "torch"


def _plan(backend: str, params, grads, states: Dict[str, Sequence[torch.Tensor]], steps, active):
    """``[(backend, indices)]``: one fused call per (device, dtype) and the reference for the rest."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    plan, fallback = [], []
    for (device, dtype), indices in groups.items():
        chosen = resolve_step_backend(backend, device, dtype)
        if chosen == "torch":
            fallback += indices
            continue
        fused = []
        for i in indices:
            problem = _fused_problem(params[i], grads[i], [s[i] for s in states.values()], steps[i], active[i])
            if problem is None:
                fused.append(i)
            elif backend == "auto":
                fallback.append(i)
            else:
                raise ValueError(f"backend={backend!r} cannot step params[{i}] (shape {list(params[i].shape)}): "
                                 f"{problem}; use backend='auto' or 'torch'")
        if fused:
            plan.append((chosen, fused))
    if fallback:
        plan.append(("torch", sorted(fallback)))
    return plan


def _pick(values, indices):
    return [values[i] for i in indices]


# ----------------------------------------------------------------------------------- Adam
def masked_adam_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    steps: Sequence[torch.Tensor],
    active: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """Plain-torch definition of the masked Adam/AdamW step (in place).

    torch's single-tensor Adam with per-row (or per-element) step counts, computed for every
    element and written back only where ``active`` is True (``torch.where`` keeps the old bits).
    ``active[i]`` and ``steps[i]`` may be row-shaped ``[C]`` or of the parameter's full shape.
    """
    for i, p in enumerate(params):
        act = active[i]
        opmath = state_dtype(p.dtype)
        step_new = steps[i] + (1.0 if act is None else _per_row(act, steps[i]).to(torch.float32))
        step_b = _per_row(step_new, p).double()  # [C, 1, ...] or p.shape
        bc1 = 1 - beta1 ** step_b
        bc2 = 1 - beta2 ** step_b
        neg_step_size = (-(lr / bc1)).to(opmath)
        bc2_sqrt = bc2.pow(0.5).to(opmath)
        param = p.to(opmath)
        grad = grads[i].to(opmath)
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                param = param.mul(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        m = exp_avgs[i].lerp(grad, 1 - beta1)
        v = exp_avg_sqs[i].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        v_use = v
        if amsgrad:
            v_use = torch.maximum(max_exp_avg_sqs[i], v)
        denom = (v_use.sqrt() / bc2_sqrt).add_(eps)
        new_param = param + neg_step_size * m / denom
        if act is None:
            p.copy_(new_param)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            if amsgrad:
                max_exp_avg_sqs[i].copy_(v_use)
            steps[i].copy_(step_new)
            continue
        keep = _per_row(act, p)
        p.copy_(torch.where(keep, new_param.to(p.dtype), p))
        exp_avgs[i].copy_(torch.where(keep, m, exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(keep, v, exp_avg_sqs[i]))
        if amsgrad:
            max_exp_avg_sqs[i].copy_(torch.where(keep, v_use, max_exp_avg_sqs[i]))
        steps[i].copy_(step_new)


def masked_adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    active: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None,
    lr: float = 1e-3,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> None:
    """One Adam (``decoupled_weight_decay=True``: AdamW) step of the active rows, in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, steps, active: lists with one entry per parameter,
            as in the module docstring (``active=None``: every row of every parameter).
        max_exp_avg_sqs: with ``amsgrad``, the running maxima of ``exp_avg_sqs``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
        backend: ``auto``, ``torch``, ``cpp``, ``triton`` or ``cuda``.
        check_inputs: validate every list entry (shapes, dtypes, devices); callers that built the
            state themselves (the optimizers) pass False to save the per-tensor Python checks.

    Example::

        >>> import torch
        >>> from spurfast.ops.masked_step import masked_adam_step
        >>> p, g = torch.ones(3, 2), torch.ones(3, 2)
        >>> m, v, step = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3)
        >>> masked_adam_step([p], [g], [m], [v], [step], [torch.tensor([True, False, True])], lr=0.1)
        >>> [round(x, 4) for x in p[:, 0].tolist()], step.tolist()  # Adam's first step moves by lr
        ([0.9, 1.0, 0.9], [1.0, 0.0, 1.0])
    """
    beta1, beta2 = _check_betas(betas)
    _check_scalars(lr=lr, eps=eps, weight_decay=weight_decay)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs (one tensor per parameter)")
    states = dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    if check_inputs:
        active = _check_lists(params, grads, states, steps, active)
    elif active is None:
        active = [None] * len(params)
    if not params:
        return
    scalars = dict(lr=float(lr), beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                   decoupled_weight_decay=bool(decoupled_weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize))
    for chosen, idx in _plan(backend, params, grads, states, steps, active):
        lists = [_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                 _pick(max_exp_avg_sqs, idx) if amsgrad else [], _pick(steps, idx), _pick(active, idx)]
        if chosen == "torch":
            masked_adam_step_reference(*lists, **scalars)
        elif chosen == "cuda":
            _cuda_ext().masked_adam_step_cuda(*lists, *scalars.values())
        elif chosen == "triton" and lists[0][0].device.type == "cpu":  # the interpreter: call the kernel directly
            _adam_triton(*lists, *scalars.values())
        else:
            torch.ops.spurfast.masked_adam_step(*lists, *scalars.values())


# ------------------------------------------------------------------------------------ SGD
def masked_sgd_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    active: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Plain-torch definition of the masked SGD step (in place); ``momentum_buffers`` is
    ignored (may be empty) when ``momentum == 0``. A row whose step count is 0 gets its
    buffer set to its gradient, as torch does at a buffer's first step."""
    for i, p in enumerate(params):
        act = active[i]
        opmath = state_dtype(p.dtype)
        step_new = steps[i] + (1.0 if act is None else _per_row(act, steps[i]).to(torch.float32))
        param = p.to(opmath)
        grad = grads[i].to(opmath)
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        buf = None
        if momentum != 0:
            first = _per_row(step_new == 1, p)
            buf = torch.where(first, grad, momentum_buffers[i].mul(momentum).add_(grad, alpha=1 - dampening))
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        new_param = param.add(grad, alpha=-lr)
        keep = None if act is None else _per_row(act, p)
        p.copy_(new_param if keep is None else torch.where(keep, new_param.to(p.dtype), p))
        if buf is not None:
            momentum_buffers[i].copy_(buf if keep is None else torch.where(keep, buf, momentum_buffers[i]))
        steps[i].copy_(step_new)


def masked_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    active: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    backend: str = "auto",
    check_inputs: bool = True,
) -> None:
    """One SGD step (momentum, dampening, Nesterov, weight decay as ``torch.optim.SGD``) of
    the active rows, in place; ``momentum_buffers`` may be empty when ``momentum == 0``.
    Other arguments as in :func:`masked_adam_step`.

    Example::

        >>> import torch
        >>> from spurfast.ops.masked_step import masked_sgd_step
        >>> p, g, step = torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2)
        >>> masked_sgd_step([p], [g], [], [step], [torch.tensor([False, True])], lr=0.5)
        >>> p.tolist(), step.tolist()
        ([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], [0.0, 1.0])
    """
    _check_scalars(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")
    states = dict(momentum_buffers=momentum_buffers) if momentum != 0 else {}
    if check_inputs:
        active = _check_lists(params, grads, states, steps, active)
    elif active is None:
        active = [None] * len(params)
    if not params:
        return
    scalars = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                   weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize))
    for chosen, idx in _plan(backend, params, grads, states, steps, active):
        lists = [_pick(params, idx), _pick(grads, idx), _pick(momentum_buffers, idx) if momentum != 0 else [],
                 _pick(steps, idx), _pick(active, idx)]
        if chosen == "torch":
            masked_sgd_step_reference(*lists, **scalars)
        elif chosen == "cuda":
            _cuda_ext().masked_sgd_step_cuda(*lists, *scalars.values())
        elif chosen == "triton" and lists[0][0].device.type == "cpu":
            _sgd_triton(*lists, *scalars.values())
        else:
            torch.ops.spurfast.masked_sgd_step(*lists, *scalars.values())


def _check_betas(betas) -> Tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats, got {betas!r}") from None
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (expected 0 <= beta < 1)")
    return beta1, beta2


def _check_scalars(**values) -> None:
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a float (or a 1-element tensor), got shape {list(value.shape)}")
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not value >= 0.0:  # also rejects NaN
            raise ValueError(f"Invalid {name}: {value} (expected >= 0)")
