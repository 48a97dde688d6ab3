"""Per-sample, per-neuron gradient statistics of a 1-D or 2-D convolution.

A neuron is an output channel ``W[c]`` (``[Cin / groups, *kernel]``). Sample n's weight
gradient is, per conv group, ``G_n^T U_n`` where ``U_n`` ``[L, Kg]`` holds the im2col
patches of the input and ``G_n`` ``[L, Cout / groups]`` the output gradient at the L output
positions. The op returns ``grad_sq [B, Cout]`` and ``group_grad [G, *W.shape]`` with the
same meaning as :func:`spurfast.ops.linear_grad_stats`. Any stride, padding (numeric,
``'same'`` or ``'valid'``), dilation and groups (depthwise included); Conv1d runs as a 2-D
convolution of height 1.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from spurfast._extension import require_extension
from spurfast.ops._common import (
    acc_dtype,
    common_dtype,
    check_finite,
    check_floating,
    check_group_ids,
    check_method,
    choose_method,
    input_gram_shape,
    live_padding,
    live_window,
    pair,
    reduce_per_sample_grad,
    resolve_backend,
    triton_module,
)
from spurfast.ops._library import lib, register_fake

lib.define(
    "conv2d_grad_stats(Tensor x, Tensor grad_out, int[] kernel_size, int[] stride, int[] padding,"
    " int[] dilation, int groups, Tensor group_ids, int num_groups, str method) -> (Tensor, Tensor)"
)


def _conv2d_grad_stats_cpu(x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method):
    grad_sq, group_grad = require_extension("cpp").conv2d_grad_stats(
        x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method
    )
    return grad_sq, group_grad


def _conv2d_grad_stats_triton(x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method):
    grad_sq, group_grad = triton_module("grad_stats").conv2d_grad_stats_triton(
        x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method
    )
    return grad_sq, group_grad


lib.impl("conv2d_grad_stats", _conv2d_grad_stats_cpu, "CPU")
lib.impl("conv2d_grad_stats", _conv2d_grad_stats_triton, "CUDA")


@register_fake("spurfast::conv2d_grad_stats")
def _conv2d_grad_stats_fake(x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method):
    dtype = acc_dtype(x.dtype)
    out_channels = grad_out.shape[1]
    return (
        x.new_empty((x.shape[0], out_channels), dtype=dtype),
        x.new_empty((num_groups, out_channels, x.shape[1] // groups, *kernel_size), dtype=dtype),
    )


def conv2d_per_sample_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Every sample's weight gradient ``[B, Cout, Cin / groups, kh, kw]`` of a 2-D convolution."""
    dtype = acc_dtype(x.dtype)
    batch, in_channels = x.shape[:2]
    out_channels = grad_out.shape[1]
    patches = F.unfold(x.to(dtype), kernel_size, dilation=dilation, padding=padding, stride=stride)
    patches = rearrange(patches, "b (k kg) l -> b k l kg", k=groups)  # [B, groups, L, Kg]
    grads = rearrange(grad_out.to(dtype), "b (k cg) h w -> b k (h w) cg", k=groups)
    if patches.shape[2] != grads.shape[2]:
        raise ValueError(
            f"grad_out has {grads.shape[2]} output positions but the convolution of x has {patches.shape[2]}"
        )
    per_sample_grad = einsum(grads, patches, "b k l cg, b k l kg -> b k cg kg")
    return per_sample_grad.reshape(batch, out_channels, in_channels // groups, *kernel_size)


def conv2d_grad_stats_reference(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    group_ids: torch.Tensor,
    num_groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch definition for 4-D inputs: unfold, form every per-sample gradient, reduce."""
    per_sample_grad = conv2d_per_sample_grad(x, grad_out, kernel_size, stride, padding, dilation, groups)
    return reduce_per_sample_grad(per_sample_grad, group_ids, num_groups)


def conv_padding(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Union[str, int, Sequence[int]],
    dilation: Sequence[int],
) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``(x, padding)`` with per-dim numeric padding for a conv call on ``x [B, C, *spatial]``.

    ``'valid'`` and ``'same'`` mean what they mean in ``F.conv1d``/``F.conv2d``. Where 'same'
    needs an odd total padding in some dim, torch puts the extra element on the right/bottom;
    symmetric numeric padding cannot express that, so x itself is zero-padded (a copy) and
    the returned padding is 0. ``kernel_size``, ``stride`` and ``dilation`` have one entry per
    spatial dim.
    """
    spatial = len(kernel_size)
    if not isinstance(padding, str):
        return x, pair(padding, spatial, "padding")
    if padding == "valid":
        return x, (0,) * spatial
    if padding != "same":
        raise ValueError(f"padding must be an int, a sequence of ints, 'same' or 'valid', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' needs stride 1 (as in F.conv1d/F.conv2d), got stride={tuple(stride)}")
    totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if all(t % 2 == 0 for t in totals):
        return x, tuple(t // 2 for t in totals)
    pads = []
    for total in reversed(totals):  # F.pad lists the last dim first
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0,) * spatial


def conv_grad_stats_reference(x, grad_out, weight_shape, stride, padding, dilation, groups, group_ids, num_groups):
    """Plain-torch reference for Conv1d/Conv2d; same arguments as :func:`conv_grad_stats`."""
    args = _as_2d(x, grad_out, weight_shape, stride, padding, dilation)
    grad_sq, group_grad = conv2d_grad_stats_reference(*args[:2], *args[2:], groups, group_ids, num_groups)
    return grad_sq, group_grad.reshape((num_groups,) + tuple(weight_shape))


def _as_2d(x, grad_out, weight_shape, stride, padding, dilation):
    """Lift a 1-D convolution to 2-D (height 1); pass 2-D through. Returns 4-D tensors and pairs."""
    spatial = len(weight_shape) - 2
    if spatial not in (1, 2):
        raise ValueError(f"weight_shape must be [Cout, Cin/groups, k] or [Cout, Cin/groups, kh, kw], got {list(weight_shape)}")
    if x.dim() != spatial + 2 or grad_out.dim() != spatial + 2:
        raise ValueError(
            f"a {spatial}-D convolution needs x and grad_out of {spatial + 2} dims, got {list(x.shape)} and {list(grad_out.shape)}"
        )
    kernel = tuple(int(k) for k in weight_shape[2:])
    stride, dilation = pair(stride, spatial, "stride"), pair(dilation, spatial, "dilation")
    x, padding = conv_padding(x, kernel, stride, padding, dilation)
    if spatial == 1:
        return (x.unsqueeze(2), grad_out.unsqueeze(2), (1,) + kernel, (1,) + stride, (0,) + padding, (1,) + dilation)
    return (x, grad_out, kernel, stride, padding, dilation)


def conv_grad_stats(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Union[int, Sequence[int]],
    padding: Union[int, Sequence[int]],
    dilation: Union[int, Sequence[int]],
    groups: int,
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    backend: str = "auto",
    method: str = "auto",
    check_inputs: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared channel norms and per-group sums of a convolution's weight gradient.

    Args:
        x: layer input ``[B, Cin, L]`` (Conv1d) or ``[B, Cin, H, W]`` (Conv2d).
        grad_out: gradient w.r.t. the layer output ``[B, Cout, *out_spatial]``.
        weight_shape: the layer's ``W.shape`` (``[Cout, Cin/groups, *kernel]``).
        stride, padding, dilation, groups: as in ``F.conv1d``/``F.conv2d``: padding is an int,
            one int per spatial dim, ``'valid'`` or ``'same'`` (stride 1; an odd total pads the
            extra element on the right/bottom, as torch does). For non-zero padding modes
            (``'reflect'``, ...) pad the input yourself and pass padding 0.
        group_ids, num_groups, backend, method, check_inputs: as in :func:`linear_grad_stats`.

    Returns:
        ``grad_sq [B, Cout]`` and ``group_grad [G, *weight_shape]``.

    Example::

        >>> import torch, torch.nn.functional as F, spurfast
        >>> x, w = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 3, 3)
        >>> g = torch.randn(4, 6, 8, 8)
        >>> grad_sq, group_grad = spurfast.ops.conv_grad_stats(x, g, w.shape, 1, 1, 1, 1, torch.zeros(4, dtype=torch.long), 1)
        >>> dw = torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)
        >>> torch.allclose(group_grad[0], dw, atol=1e-4)
        True
    """
    check_floating(x, "x")
    check_floating(grad_out, "grad_out")
    weight_shape = tuple(int(s) for s in weight_shape)
    x4, g4, _, _, _, _ = _as_2d(x, grad_out, weight_shape, stride, padding, dilation)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    out_channels, in_per_group = weight_shape[:2]
    if x4.shape[1] != in_per_group * groups or g4.shape[1] != out_channels or out_channels % groups:
        raise ValueError(
            f"shapes disagree: x has {x4.shape[1]} channels, grad_out {g4.shape[1]}, "
            f"weight_shape {list(weight_shape)} with groups={groups}"
        )
    if x4.shape[0] != g4.shape[0]:
        raise ValueError(f"x and grad_out disagree in batch size: {x.shape[0]} vs {grad_out.shape[0]}")
    if x.device != grad_out.device:
        raise ValueError(f"x is on {x.device} but grad_out is on {grad_out.device}")
    group_ids = check_group_ids(group_ids, x4.shape[0], num_groups, check_range=check_inputs).to(x.device)
    check_method(method)
    if check_inputs:
        check_finite(x, "x")
        check_finite(grad_out, "grad_out")
    return conv_grad_stats_unchecked(x, grad_out, weight_shape, stride, padding, dilation, groups, group_ids,
                                     num_groups, backend, method)


def conv_grad_stats_unchecked(x, grad_out, weight_shape, stride, padding, dilation, groups, group_ids, num_groups,
                              backend, method):
    """:func:`conv_grad_stats` on arguments known to be valid (``NeuronStats`` calls it from
    every layer's backward): ``weight_shape`` a tuple of ints, ``group_ids`` int64 ``[B]`` on
    x's device."""
    x4, g4, kernel, stride, padding, dilation = _as_2d(x, grad_out, weight_shape, stride, padding, dilation)
    x4, g4 = common_dtype(x4, g4)
    out_channels, in_per_group = weight_shape[:2]
    backend = resolve_backend(backend, x.device, x4.dtype)
    if backend == "torch":
        grad_sq, group_grad = conv2d_grad_stats_reference(
            x4, g4, kernel, stride, padding, dilation, groups, group_ids, num_groups
        )
    else:
        window = live_window(x4.shape[2:], g4.shape[2:], kernel, stride, padding, dilation)
        if window is None:
            grad_sq, group_grad = _conv2d_grad_stats_kernel(
                x4, g4, kernel, stride, padding, dilation, groups, group_ids, num_groups, backend, method
            )
        else:
            # Taps that read only padding add nothing: work on the live window, zeros elsewhere.
            (lo_h, hi_h), (lo_w, hi_w) = window
            live_kernel = (hi_h - lo_h, hi_w - lo_w)
            grad_sq, live = _conv2d_grad_stats_kernel(
                x4, g4, live_kernel, stride, live_padding(padding, window, dilation), dilation, groups, group_ids,
                num_groups, backend, method,
            )
            group_grad = live.new_zeros((num_groups, out_channels, in_per_group) + kernel)
            group_grad[:, :, :, lo_h:hi_h, lo_w:hi_w] = live.view(group_grad[:, :, :, lo_h:hi_h, lo_w:hi_w].shape)
    return grad_sq, group_grad.reshape((num_groups,) + weight_shape)


def _conv2d_grad_stats_kernel(x4, g4, kernel, stride, padding, dilation, groups, group_ids, num_groups, backend, method):
    """The compiled op on 4-D inputs; a conv whose window covers its whole unpadded input at
    one output position is a Linear of one token (rank one: no product, dW by one GEMM)."""
    batch, out_channels = g4.shape[:2]
    if (groups == 1 and tuple(g4.shape[2:]) == (1, 1) and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)
            and tuple(kernel) == tuple(x4.shape[2:]) and backend == "cpp"):
        grad_sq, group_grad = torch.ops.spurfast.linear_grad_stats(
            x4.reshape(batch, 1, -1), g4.reshape(batch, 1, out_channels), group_ids, num_groups, "direct"
        )
        return grad_sq, group_grad
    if method == "auto":
        positions = g4.shape[2] * g4.shape[3]
        method = choose_method(positions, out_channels // groups, x4.shape[1] // groups * kernel[0] * kernel[1],
                               backend, linear=False, input_gram=input_gram_shape(x4, groups))
    args = (x4, g4, list(kernel), list(stride), list(padding), list(dilation), groups, group_ids, num_groups, method)
    if backend == "triton" and x4.device.type == "cpu":  # the interpreter: call the kernels directly
        return _conv2d_grad_stats_triton(*args)
    return torch.ops.spurfast.conv2d_grad_stats(*args)

