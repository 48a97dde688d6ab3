"""Per-sample channel means of a layer's output and their per-group moments.

``act[n, c]`` is the mean of output channel c of sample n over its positions (tokens or
spatial positions); per group g the op returns the sample count, the mean of ``act[:, c]``
and the sum of squared deviations ``m2`` (float64), which
:func:`merge_group_moments` combines across batches (Chan, Golub and LeVeque).
"""
from __future__ import annotations

from typing import Tuple

import torch

from spurfast._extension import require_extension
from spurfast.ops._common import (
    acc_dtype,
    check_finite,
    check_floating,
    check_group_ids,
    group_counts,
    resolve_backend,
    triton_module,
)
from spurfast.ops._library import lib, register_fake

lib.define(
    "activation_stats(Tensor y, Tensor group_ids, int num_groups, bool channels_last)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)


def _activation_stats_cpu(y, group_ids, num_groups, channels_last):
    act, count, mean, m2 = require_extension("cpp").activation_stats(y, group_ids, num_groups, channels_last)
    return act, count, mean, m2


def _activation_stats_triton(y, group_ids, num_groups, channels_last):
    act, count, mean, m2 = triton_module("activation_stats").activation_stats_triton(y, group_ids, num_groups, channels_last)
    return act, count, mean, m2


lib.impl("activation_stats", _activation_stats_cpu, "CPU")
lib.impl("activation_stats", _activation_stats_triton, "CUDA")


@register_fake("spurfast::activation_stats")
def _activation_stats_fake(y, group_ids, num_groups, channels_last):
    channels = y.shape[2] if channels_last else y.shape[1]
    return (
        y.new_empty((y.shape[0], channels), dtype=acc_dtype(y.dtype)),
        y.new_empty((num_groups,), dtype=torch.int64),
        y.new_empty((num_groups, channels), dtype=torch.float64),
        y.new_empty((num_groups, channels), dtype=torch.float64),
    )


def activation_stats_reference(
    y: torch.Tensor, group_ids: torch.Tensor, num_groups: int, channels_last: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch definition for ``y`` ``[B, C, P]`` (or ``[B, P, C]`` if channels_last)."""
    act = y.to(acc_dtype(y.dtype)).mean(1 if channels_last else 2)  # [B, C]
    act64 = act.double()
    count = group_counts(group_ids, num_groups)
    total = act64.new_zeros(num_groups, act.shape[1]).index_add_(0, group_ids, act64)
    mean = total / count.clamp(min=1).unsqueeze(1)
    deviation = act64 - mean[group_ids]
    m2 = act64.new_zeros(num_groups, act.shape[1]).index_add_(0, group_ids, deviation.square())
    return act, count, mean, m2


def activation_stats(
    y: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    channel_dim: int = 1,
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample channel means ``act [B, C]`` and per-group ``count [G]``, ``mean [G, C]``, ``m2 [G, C]``.

    Args:
        y: a layer output ``[B, C, *spatial]`` (``channel_dim=1``, convolutions) or
            ``[B, *, C]`` (``channel_dim=-1``, linear layers).
        group_ids, num_groups, backend, check_inputs: as in :func:`linear_grad_stats`.

    Example::

        >>> import torch, spurfast
        >>> y = torch.randn(6, 4, 5, 5)
        >>> act, count, mean, m2 = spurfast.ops.activation_stats(y, torch.tensor([0, 0, 1, 1, 1, 2]), 3)
        >>> count.tolist(), act.shape
        ([2, 3, 1], torch.Size([6, 4]))
    """
    check_floating(y, "y")
    if y.dim() < 2:
        raise ValueError(f"y must have a batch and a channel dim, got shape {list(y.shape)}")
    if channel_dim not in (1, -1, y.dim() - 1):
        raise ValueError(f"channel_dim must be 1 or -1, got {channel_dim}")
    channels_last = channel_dim != 1 or y.dim() == 2
    y3 = y.reshape(y.shape[0], -1, y.shape[-1]) if channels_last else y.reshape(y.shape[0], y.shape[1], -1)
    group_ids = check_group_ids(group_ids, y.shape[0], num_groups, check_range=check_inputs).to(y.device)
    if check_inputs:
        check_finite(y, "y")
    backend = resolve_backend(backend, y.device, y.dtype)
    if backend == "torch":
        return activation_stats_reference(y3, group_ids, num_groups, channels_last)
    if backend == "triton" and y.device.type == "cpu":  # the interpreter: call the kernel directly
        return _activation_stats_triton(y3, group_ids, num_groups, channels_last)
    return torch.ops.spurfast.activation_stats(y3, group_ids, num_groups, channels_last)


def merge_group_moments(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two sets of per-group moments (``count [G]``, ``mean [G, C]``, ``m2 [G, C]``).

    Chan et al.'s pairwise update, exact in exact arithmetic and stable in float64; a
    group empty on one side takes the other side's moments unchanged. The counts may also be
    ``[G, C]``, one per channel (several layers' channels side by side, each with its own counts).
    """
    count = count_a + count_b
    n_a = count_a.to(mean_a.dtype)
    n_b = count_b.to(mean_a.dtype)
    if n_a.dim() == 1:
        n_a, n_b = n_a.unsqueeze(1), n_b.unsqueeze(1)
    n = (n_a + n_b).clamp(min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b / n)
    return count, mean, m2
