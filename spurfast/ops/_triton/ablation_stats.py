"""Triton kernel for the first-order ablation effect ``[B, C]`` (lazily imported).

One program per (sample, block of channels) reads the output y and its gradient tile by
tile along positions and accumulates ``grad_out * (y - bias)`` in float32.
"""
# No `from __future__ import annotations` (see activation_stats.py: Triton 3.0's interpreter).

import torch
import triton
import triton.language as tl


@triton.jit
def _ablation_kernel(y_ptr, g_ptr, b_ptr, out_ptr, C, P, syn, syc, syp, sgn, sgc, sgp,
                     HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    y_base = y_ptr + n.to(tl.int64) * syn
    g_base = g_ptr + n.to(tl.int64) * sgn
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = c_ok[:, None] & (offs_p[None, :] < P)
        y = tl.load(y_base + offs_c.to(tl.int64)[:, None] * syc + offs_p.to(tl.int64)[None, :] * syp,
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs_c.to(tl.int64)[:, None] * sgc + offs_p.to(tl.int64)[None, :] * sgp,
                    mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(g * (y - bias[:, None]), axis=1)
    tl.store(out_ptr + n.to(tl.int64) * C + offs_c, -total, mask=c_ok)


def ablation_stats_triton(y: torch.Tensor, grad_out: torch.Tensor, bias, channels_last: bool) -> torch.Tensor:
    """y, grad_out ``[B, C, P]`` (or ``[B, P, C]``), bias ``[C]`` or None -> ``ablation [B, C]`` float32."""
    if y.dtype == torch.float64:
        raise TypeError("the triton backend takes float16/bfloat16/float32 inputs; use backend='torch' for float64")
    batch = y.shape[0]
    channels, positions = (y.shape[2], y.shape[1]) if channels_last else (y.shape[1], y.shape[2])

    def strides(t):
        return (t.stride(0), t.stride(2), t.stride(1)) if channels_last else (t.stride(0), t.stride(1), t.stride(2))

    out = torch.empty(batch, channels, device=y.device, dtype=torch.float32)
    if batch == 0 or channels == 0:
        return out
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else out  # never read without HAS_BIAS
    block_c = min(64, triton.next_power_of_2(channels))
    _ablation_kernel[(batch, triton.cdiv(channels, block_c))](
        y, grad_out, bias_arg, out, channels, positions, *strides(y), *strides(grad_out),
        HAS_BIAS=has_bias, BLOCK_C=block_c, BLOCK_P=64)
    return out
