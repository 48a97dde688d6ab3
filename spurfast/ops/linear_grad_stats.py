"""Per-sample, per-neuron gradient statistics of a linear layer.

For ``y = x @ W.T`` with x ``[B, *, D]`` and the gradient ``grad_out = dL/dy`` ``[B, *, C]``,
sample n's weight gradient is ``G_n^T X_n`` (``[C, D]``, summed over its positions). The op
returns

* ``grad_sq [B, C]``: ``||(G_n^T X_n)[c]||^2``, the squared norm of each neuron's row;
* ``group_grad [G, C, D]``: the per-sample gradients summed within each group, so that
  ``group_grad.sum(0)`` is the weight gradient.

Backends: ``torch`` (the reference below; materialises per-sample gradients) and ``cpp``
(``csrc/grad_stats.cpp``; memory O(B*C + G*C*D)).

:func:`linear_grad_stats_with_ablation` also returns the removal effect
``ablation [B, C] = -<dW_n[c], W[c]>`` (see :mod:`spurfast.ops.ablation_stats`), formed from
the same per-sample products while they are in cache, so that the layer's output need not be
kept until the backward (CPU, the direct path).
"""
from __future__ import annotations

from typing import Tuple

import torch
from einops import einsum

from spurfast._extension import require_extension
from spurfast.ops.ablation_stats import ablation_stats_reference
from spurfast.ops._common import (
    acc_dtype,
    common_dtype,
    check_finite,
    check_floating,
    check_group_ids,
    check_method,
    choose_method,
    reduce_per_sample_grad,
    resolve_backend,
    triton_module,
)
from spurfast.ops._library import lib, register_fake

lib.define(
    "linear_grad_stats(Tensor x, Tensor grad_out, Tensor group_ids, int num_groups, str method)"
    " -> (Tensor, Tensor)"
)


def _linear_grad_stats_cpu(x, grad_out, group_ids, num_groups, method):
    grad_sq, group_grad = require_extension("cpp").linear_grad_stats(x, grad_out, group_ids, num_groups, method)
    return grad_sq, group_grad


def _linear_grad_stats_triton(x, grad_out, group_ids, num_groups, method):
    grad_sq, group_grad = triton_module("grad_stats").linear_grad_stats_triton(x, grad_out, group_ids, num_groups, method)
    return grad_sq, group_grad


lib.impl("linear_grad_stats", _linear_grad_stats_cpu, "CPU")
lib.impl("linear_grad_stats", _linear_grad_stats_triton, "CUDA")

lib.define(
    "linear_grad_stats_ablation(Tensor x, Tensor grad_out, Tensor weight, Tensor group_ids, int num_groups)"
    " -> (Tensor, Tensor, Tensor)"
)


def _linear_grad_stats_ablation_cpu(x, grad_out, weight, group_ids, num_groups):
    grad_sq, group_grad, ablation = require_extension("cpp").linear_grad_stats_ablation(
        x, grad_out, weight, group_ids, num_groups)
    return grad_sq, group_grad, ablation


lib.impl("linear_grad_stats_ablation", _linear_grad_stats_ablation_cpu, "CPU")


@register_fake("spurfast::linear_grad_stats")
def _linear_grad_stats_fake(x, grad_out, group_ids, num_groups, method):
    batch, out_features, in_features = x.shape[0], grad_out.shape[2], x.shape[2]
    dtype = acc_dtype(x.dtype)
    return (
        x.new_empty((batch, out_features), dtype=dtype),
        x.new_empty((num_groups, out_features, in_features), dtype=dtype),
    )


@register_fake("spurfast::linear_grad_stats_ablation")
def _linear_grad_stats_ablation_fake(x, grad_out, weight, group_ids, num_groups):
    grad_sq, group_grad = _linear_grad_stats_fake(x, grad_out, group_ids, num_groups, "direct")
    return grad_sq, group_grad, grad_sq.new_empty(grad_sq.shape)


def linear_per_sample_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Every sample's weight gradient ``[B, C, D]`` from x ``[B, T, D]`` and grad_out ``[B, T, C]``."""
    dtype = acc_dtype(x.dtype)
    return einsum(grad_out.to(dtype), x.to(dtype), "b t c, b t d -> b c d")


def linear_grad_stats_reference(
    x: torch.Tensor, grad_out: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch definition: form every per-sample gradient, then reduce.

    Same shapes as :func:`linear_grad_stats`: x ``[B, D]`` or ``[B, ..., D]``, grad_out
    ``[B, C]`` or ``[B, ..., C]``, group_ids ``[B]`` in ``[0, num_groups)``.
    """
    check_floating(x, "x")
    check_floating(grad_out, "grad_out")
    x3, g3 = _as_token_pair(x, grad_out)
    group_ids = check_group_ids(group_ids, x3.shape[0], num_groups).to(x.device)
    return _linear_grad_stats_torch(x3, g3, group_ids, num_groups)


def _linear_grad_stats_torch(x3: torch.Tensor, g3: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    per_sample_grad = linear_per_sample_grad(x3, g3)  # [B, C, D]
    return reduce_per_sample_grad(per_sample_grad, group_ids, num_groups)


def as_tokens(t: torch.Tensor, name: str) -> torch.Tensor:
    """View ``[B, D]`` or ``[B, *, D]`` as ``[B, T, D]``."""
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [B, D] or [B, ..., D], got {list(t.shape)}")
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _as_token_pair(x: torch.Tensor, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, T, D]`` and grad_out ``[B, T, C]``, after checking that their leading dims agree."""
    x3, g3 = as_tokens(x, "x"), as_tokens(grad_out, "grad_out")
    if x3.shape[:2] != g3.shape[:2] or x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(
            f"x [B, ..., D] and grad_out [B, ..., C] must share leading dims, got {list(x.shape)} and {list(grad_out.shape)}"
        )
    if x.device != grad_out.device:
        raise ValueError(f"x is on {x.device} but grad_out is on {grad_out.device}")
    return x3, g3


def _checked_inputs(x, grad_out, group_ids, num_groups, backend, check_inputs):
    """The public ops' argument checks: ``(x3 [B, T, D], g3 [B, T, C], group_ids on x's device,
    resolved backend)``, x3 and g3 in one dtype."""
    check_floating(x, "x")
    check_floating(grad_out, "grad_out")
    x3, g3 = _as_token_pair(x, grad_out)
    group_ids = check_group_ids(group_ids, x3.shape[0], num_groups, check_range=check_inputs).to(x.device)
    if check_inputs:
        check_finite(x, "x")
        check_finite(grad_out, "grad_out")
    x3, g3 = common_dtype(x3, g3)
    return x3, g3, group_ids, resolve_backend(backend, x.device, x3.dtype)


def linear_grad_stats(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    backend: str = "auto",
    method: str = "auto",
    check_inputs: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared row norms and per-group sums of a linear layer's weight gradient.

    Args:
        x: layer input ``[B, D]`` or ``[B, ..., D]`` (positions are summed, as autograd does).
        grad_out: gradient w.r.t. the layer output, ``[B, C]`` or ``[B, ..., C]``.
        group_ids: ``[B]`` integer group of each sample, in ``[0, num_groups)``.
        num_groups: number of groups G.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` (CPU) or ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
        method: ``"auto"`` (cost model), ``"direct"`` (per-sample products, chunked) or
            ``"gram"`` (``g^T (X X^T) g``); ignored by the torch backend.
        check_inputs: check that x and grad_out are finite and group_ids lie in range (both
            read values back to the host: a device synchronisation). Pass ``False`` only for
            inputs already validated; out-of-range ids then read out of bounds.

    Returns:
        ``grad_sq [B, C]`` and ``group_grad [G, C, D]``, float32 (float64 for float64 input).

    Example::

        >>> import torch, spurfast
        >>> x, g = torch.randn(8, 5), torch.randn(8, 3)
        >>> grad_sq, group_grad = spurfast.ops.linear_grad_stats(x, g, torch.arange(8) % 2, 2)
        >>> torch.allclose(group_grad.sum(0), g.T @ x, atol=1e-5)
        True
    """
    check_method(method)
    x3, g3, group_ids, backend = _checked_inputs(x, grad_out, group_ids, num_groups, backend, check_inputs)
    if backend == "torch":
        return _linear_grad_stats_torch(x3, g3, group_ids, num_groups)  # inputs already checked
    if method == "auto":
        method = choose_method(x3.shape[1], g3.shape[2], x3.shape[2], backend)
    if backend == "triton" and x.device.type == "cpu":  # the interpreter: call the kernels directly
        return _linear_grad_stats_triton(x3, g3, group_ids, num_groups, method)
    return torch.ops.spurfast.linear_grad_stats(x3, g3, group_ids, num_groups, method)


def linear_grad_stats_with_ablation_reference(
    x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch definition of :func:`linear_grad_stats_with_ablation`, from every per-sample gradient."""
    check_floating(x, "x")
    check_floating(grad_out, "grad_out")
    x3, g3 = _as_token_pair(x, grad_out)
    _check_weight(weight, g3.shape[2], x3.shape[2])
    group_ids = check_group_ids(group_ids, x3.shape[0], num_groups).to(x.device)
    return _with_ablation_torch(x3, g3, weight, group_ids, num_groups)


def _with_ablation_torch(x3, g3, weight, group_ids, num_groups):
    per_sample_grad = linear_per_sample_grad(x3, g3)  # [B, C, D]
    grad_sq, group_grad = reduce_per_sample_grad(per_sample_grad, group_ids, num_groups)
    return grad_sq, group_grad, ablation_stats_reference(per_sample_grad, weight).to(grad_sq.dtype)


def _check_weight(weight: torch.Tensor, out_features: int, in_features: int) -> None:
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out_features, in_features):
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a tensor of shape [{out_features}, {in_features}] ([C, D]), got {got}")
    check_floating(weight, "weight")


def linear_grad_stats_with_ablation(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_grad_stats` and the removal effect ``ablation [B, C] = -<dW_n[c], W[c]>``.

    The effect of zeroing neuron c on sample n's loss, to first order (what
    :func:`spurfast.ops.ablation_stats` computes from the layer's output and its gradient),
    taken here from the per-sample products that ``grad_sq`` needs anyway: no layer output
    is read. Backends ``"cpp"`` (the direct path, one pass over each chunk's products) and
    ``"torch"`` (per-sample gradients); ``"auto"`` is ``"cpp"`` on CPU.

    Args:
        weight: the layer's weight ``[C, D]`` at the forward (the bias does not enter).
        x, grad_out, group_ids, num_groups, backend, check_inputs: as in :func:`linear_grad_stats`.

    Returns:
        ``grad_sq [B, C]``, ``group_grad [G, C, D]`` and ``ablation [B, C]``, float32 (float64
        for float64 input).

    Example::

        >>> import torch, spurfast
        >>> x, g, w = torch.randn(4, 6, 5), torch.randn(4, 6, 3), torch.randn(3, 5)
        >>> _, _, ablation = spurfast.ops.linear_grad_stats_with_ablation(x, g, w, torch.arange(4) % 2, 2)
        >>> torch.allclose(ablation, -((x @ w.T) * g).sum(1), atol=1e-4)
        True
    """
    x3, g3, group_ids, backend = _checked_inputs(x, grad_out, group_ids, num_groups, backend, check_inputs)
    _check_weight(weight, g3.shape[2], x3.shape[2])
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if backend == "torch":
        return _with_ablation_torch(x3, g3, weight, group_ids, num_groups)
    if backend != "cpp" or x.device.type != "cpu":
        raise ValueError(
            f"linear_grad_stats_with_ablation runs on the 'cpp' (CPU) or 'torch' backend, got backend={backend!r} "
            f"on {x.device}; elsewhere use linear_grad_stats and ablation_stats on the layer's output"
        )
    return torch.ops.spurfast.linear_grad_stats_ablation(x3, g3, weight.to(x3.dtype), group_ids, num_groups)
