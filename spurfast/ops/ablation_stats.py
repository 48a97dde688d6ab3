"""First-order ablation effect of every neuron on every sample, from a layer's output and its gradient.

Zeroing row c of a layer's weight (bias kept) changes sample n's objective f_n, to first
order, by

    ablation[n, c] = -<d f_n / d W[c], W[c]> = -sum_p grad_out[n, c, p] * (y[n, c, p] - b[c])

where y is the layer output at position p (a token, a spatial position) and b the bias: since
``y - b = W x``, the inner product of the weight gradient with the weight row is the output
gradient against the pre-bias output, summed over positions. This is "Taylor importance"
(Molchanov et al. 2017/2019) per sample. The op reads y and grad_out once and does O(B*C*P)
work, no GEMM: the backward pass already holds both.

Backends: ``torch`` (an elementwise product and a sum), ``cpp`` (``csrc/ablation_stats.cpp``)
and ``triton``. :func:`ablation_stats_reference` is the definition from per-sample weight
gradients, for tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from spurfast._extension import require_extension
from spurfast.ops._common import acc_dtype, check_finite, check_floating, resolve_backend, triton_module
from spurfast.ops._library import lib, register_fake

lib.define("ablation_stats(Tensor y, Tensor grad_out, Tensor? bias, bool channels_last) -> Tensor")


def _ablation_stats_cpu(y, grad_out, bias, channels_last):
    return require_extension("cpp").ablation_stats(y, grad_out, bias, channels_last)


def _ablation_stats_triton(y, grad_out, bias, channels_last):
    return triton_module("ablation_stats").ablation_stats_triton(y, grad_out, bias, channels_last)


lib.impl("ablation_stats", _ablation_stats_cpu, "CPU")
lib.impl("ablation_stats", _ablation_stats_triton, "CUDA")


@register_fake("spurfast::ablation_stats")
def _ablation_stats_fake(y, grad_out, bias, channels_last):
    channels = y.shape[2] if channels_last else y.shape[1]
    return y.new_empty((y.shape[0], channels), dtype=acc_dtype(y.dtype))


def ablation_stats_reference(per_sample_grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The definition: ``-<per_sample_grad[n, c], weight[c]>`` ``[B, C]`` from per-sample gradients ``[B, *W.shape]``."""
    dtype = torch.promote_types(acc_dtype(per_sample_grad.dtype), acc_dtype(weight.dtype))
    return -(per_sample_grad.to(dtype) * weight.to(dtype)).flatten(2).sum(-1)


def _ablation_stats_torch(y3: torch.Tensor, g3: torch.Tensor, bias: Optional[torch.Tensor], channels_last: bool):
    dtype = acc_dtype(y3.dtype)
    pre_bias = y3.to(dtype)
    if bias is not None:
        pre_bias = pre_bias - (bias.to(dtype) if channels_last else bias.to(dtype).unsqueeze(1))
    return -(g3.to(dtype) * pre_bias).sum(1 if channels_last else 2)


def ablation_stats(
    y: torch.Tensor,
    grad_out: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    channel_dim: int = 1,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """First-order effect ``[B, C]`` on each sample's objective of zeroing each weight row.

    Args:
        y: the layer output, bias included: ``[B, C, *spatial]`` (``channel_dim=1``,
            convolutions) or ``[B, *, C]`` (``channel_dim=-1``, linear layers).
        grad_out: the gradient of the (per-sample) objective with respect to ``y``, same shape.
        bias: the layer's bias ``[C]`` (subtracted from ``y``: zeroing a row keeps the bias),
            or ``None``.
        channel_dim, backend, check_inputs: as in :func:`spurfast.ops.activation_stats`.

    Returns:
        ``ablation [B, C]`` float32 (float64 for float64 input).

    Example::

        >>> import torch, spurfast
        >>> x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
        >>> y, g = x @ w.T + b, torch.randn(4, 3)
        >>> per_sample_grad = g[:, :, None] * x[:, None, :]  # [B, C, D]
        >>> a = spurfast.ops.ablation_stats(y, g, b, channel_dim=-1)
        >>> torch.allclose(a, spurfast.ops.ablation_stats_reference(per_sample_grad, w), atol=1e-5)
        True
    """
    check_floating(y, "y")
    check_floating(grad_out, "grad_out")
    if y.dim() < 2:
        raise ValueError(f"y must have a batch and a channel dim, got shape {list(y.shape)}")
    if grad_out.shape != y.shape:
        raise ValueError(f"grad_out must have the shape of y {list(y.shape)}, got {list(grad_out.shape)}")
    if grad_out.device != y.device:
        raise ValueError(f"y is on {y.device} but grad_out is on {grad_out.device}")
    if channel_dim not in (1, -1, y.dim() - 1):
        raise ValueError(f"channel_dim must be 1 or -1, got {channel_dim}")
    channels_last = channel_dim != 1 or y.dim() == 2
    channels = y.shape[-1] if channels_last else y.shape[1]
    if bias is not None:
        check_floating(bias, "bias")
        if tuple(bias.shape) != (channels,):
            raise ValueError(f"bias must have shape [{channels}] (one entry per channel), got {list(bias.shape)}")
        bias = bias.detach().to(y.device)
    if check_inputs:
        check_finite(y, "y")
        check_finite(grad_out, "grad_out")
    if channels_last:
        shape3 = (y.shape[0], math.prod(y.shape[1:-1]), channels)
    else:
        shape3 = (y.shape[0], channels, math.prod(y.shape[2:]))
    y3, g3 = y.reshape(shape3), grad_out.reshape(shape3)
    dtype = torch.promote_types(y3.dtype, g3.dtype)
    y3, g3 = y3.to(dtype), g3.to(dtype)
    backend = resolve_backend(backend, y.device, dtype)
    if backend == "torch":
        return _ablation_stats_torch(y3, g3, bias, channels_last)
    if bias is not None:
        bias = bias.to(acc_dtype(dtype))
    if backend == "triton" and y.device.type == "cpu":  # the interpreter: call the kernel directly
        return _ablation_stats_triton(y3, g3, bias, channels_last)
    return torch.ops.spurfast.ablation_stats(y3, g3, bias, channels_last)
