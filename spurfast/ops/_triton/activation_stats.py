"""Triton kernels for per-sample channel means and their per-group moments (lazily imported).

One kernel reads the layer output once and writes ``act [B, C]``; a second, tiny one
reduces ``act`` per group (samples sorted by group) with a two-pass mean / sum of squared
deviations in float32, stored as float64 for the cross-batch merge.
"""
# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into strings,
# which the Triton 3.0 interpreter does not recognise as constexpr (it passes every argument as a
# tensor, and `tl.arange(0, BLOCK)` fails); compiled Triton and newer interpreters (3.9 checked) accept both.

import torch
import triton
import triton.language as tl

from spurfast.ops._common import group_counts, sort_by_group


@triton.jit
def _channel_means_kernel(y_ptr, act_ptr, C, P, syn, syc, syp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    base = y_ptr + n.to(tl.int64) * syn
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ptrs = base + offs_c.to(tl.int64)[:, None] * syc + offs_p.to(tl.int64)[None, :] * syp
        tile = tl.load(ptrs, mask=(offs_c[:, None] < C) & (offs_p[None, :] < P), other=0.0)
        total += tl.sum(tile.to(tl.float32), axis=1)
    tl.store(act_ptr + n.to(tl.int64) * C + offs_c, total / P, mask=offs_c < C)


@triton.jit
def _group_moments_kernel(act_ptr, order_ptr, seg_ptr, mean_ptr, m2_ptr, C, NUM_GROUPS, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    for gi in range(NUM_GROUPS):
        lo = tl.load(seg_ptr + gi)
        hi = tl.load(seg_ptr + gi + 1)
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p in range(lo, hi):
            n = tl.load(order_ptr + p)
            total += tl.load(act_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        mean = total / tl.maximum(hi - lo, 1).to(tl.float32)
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p in range(lo, hi):
            n = tl.load(order_ptr + p)
            d = tl.load(act_ptr + n * C + offs_c, mask=c_ok, other=0.0) - mean
            m2 += d * d
        tl.store(mean_ptr + gi * C + offs_c, mean.to(tl.float64), mask=c_ok)
        tl.store(m2_ptr + gi * C + offs_c, m2.to(tl.float64), mask=c_ok)


def activation_stats_triton(y: torch.Tensor, group_ids: torch.Tensor, num_groups: int, channels_last: bool):
    """y ``[B, C, P]`` (or ``[B, P, C]``) -> ``act [B, C]``, ``count [G]``, ``mean [G, C]``, ``m2 [G, C]``."""
    if y.dtype == torch.float64:
        raise TypeError("the triton backend takes float16/bfloat16/float32 inputs; use backend='torch' for float64")
    batch = y.shape[0]
    channels, positions = (y.shape[2], y.shape[1]) if channels_last else (y.shape[1], y.shape[2])
    syn = y.stride(0)
    syc, syp = (y.stride(2), y.stride(1)) if channels_last else (y.stride(1), y.stride(2))
    act = torch.empty(batch, channels, device=y.device, dtype=torch.float32)
    count = group_counts(group_ids, num_groups)
    mean = torch.zeros(num_groups, channels, device=y.device, dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    if batch == 0:
        return act, count, mean, m2
    block_c = min(64, triton.next_power_of_2(channels))
    _channel_means_kernel[(batch, triton.cdiv(channels, block_c))](
        y, act, channels, positions, syn, syc, syp, BLOCK_C=block_c, BLOCK_P=64)
    order, seg = sort_by_group(group_ids, num_groups)
    _group_moments_kernel[(triton.cdiv(channels, 128),)](act, order, seg, mean, m2, channels, num_groups, BLOCK_C=128)
    return act, count, mean, m2
