"""Triton kernels for ``grad_sq`` and ``group_grad`` of Linear and Conv1d/2d layers.

Imported lazily (never at ``import spurfast``). One kernel family serves both layer kinds:
a linear layer on ``[B, T, D]`` is a 1x1 convolution whose T positions are the output
positions, so every kernel reads its inputs through an implicit im2col described by the
strides and geometry in :class:`Geometry`. Per-sample gradients never reach global memory.

Kernels (fp16/bf16/fp32 inputs, fp32 accumulation; fp32 dots in IEEE precision unless
``torch.backends.cuda.matmul.allow_tf32`` is set):

* ``_direct_kernel``: for each sample, the per-sample product tile ``P = G_n^T U_n``
  ``[BLOCK_C, BLOCK_K]`` is formed in registers, its squared row sums written as partial
  ``grad_sq`` and the tile added to its group's accumulator: one pass, weight-gradient FLOPs.
* ``_gram_kernel`` + ``_gram_contract_kernel``: ``grad_sq[n, c] = g_nc^T (U_n U_n^T) g_nc``,
  cheaper when positions are few (and the only tensor-core-friendly way when L < 16).
* ``_group_gemm_kernel``: ``group_grad[g] = sum over the rows of group g of G^T U``, a
  segmented GEMM over samples sorted by group (used with the Gram path).
"""
# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into strings,
# which the Triton 3.0 interpreter does not recognise as constexpr (it passes every argument as a
# tensor, and `tl.arange(0, BLOCK)` fails); compiled Triton and newer interpreters (3.9 checked) accept both.

import os
from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl

from spurfast.ops._common import sort_by_group

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(*options):
    """Autotune candidates; a single config under the interpreter, where tuning is meaningless."""
    configs = [
        triton.Config({"BLOCK_L": bl, "BLOCK_C": bc, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bl, bc, bk, w, s in options
    ]
    return configs[:1] if _INTERPRET else configs


_TILE_OPTIONS = [
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (32, 128, 64, 4, 3),
    (32, 64, 128, 4, 3),
    (64, 128, 128, 8, 3),
    (16, 32, 32, 2, 2),
]


@dataclass(frozen=True)
class Geometry:
    """Implicit im2col of one layer call: where the patch element (n, l, k) lives in x."""

    batch: int
    in_per_group: int  # Cin / groups (D for linear)
    out_per_group: int  # Cout / groups (C for linear)
    groups: int
    height: int
    width: int
    out_width: int
    positions: int  # L = Ho * Wo (T for linear)
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    x_strides: Tuple[int, int, int, int]  # (n, c, h, w)
    g_strides: Tuple[int, int, int]  # (n, c, l)

    @property
    def patch_size(self) -> int:  # K = Cin/groups * kh * kw
        return self.in_per_group * self.kh * self.kw

    @property
    def out_channels(self) -> int:
        return self.out_per_group * self.groups


def linear_geometry(x: torch.Tensor, grad_out: torch.Tensor) -> Geometry:
    """x ``[B, T, D]``, grad_out ``[B, T, C]`` seen as a 1x1 convolution over T positions."""
    b, t, d = x.shape
    return Geometry(
        b, d, grad_out.shape[2], 1, 1, t, t, t, 1, 1, 1, 1, 0, 0, 1, 1,
        (x.stride(0), x.stride(2), 0, x.stride(1)),
        (grad_out.stride(0), grad_out.stride(2), grad_out.stride(1)),
    )


def conv_geometry(x, grad_out3, out_width, kernel_size, stride, padding, dilation, groups) -> Geometry:
    """x ``[B, Cin, H, W]``, grad_out3 ``[B, Cout, L]`` (the L = Ho * Wo positions flattened)."""
    b, cin, h, w = x.shape
    return Geometry(
        b, cin // groups, grad_out3.shape[1] // groups, groups, h, w, out_width, grad_out3.shape[2],
        kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        tuple(x.stride()), tuple(grad_out3.stride()),
    )


@triton.jit
def _load_patches(x_ptr, n_rows, l_rows, row_ok, offs_k, grp, K, H, W, OUT_W, IN_PER_GROUP,
                  sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr):
    """Patch tile ``U[rows, k]`` ``[BLOCK_L, BLOCK_K]`` of samples ``n_rows`` at positions ``l_rows``."""
    cin = grp * IN_PER_GROUP + offs_k // (KH * KW)
    r = offs_k % (KH * KW)
    ki = r // KW
    kj = r % KW
    oh = l_rows // OUT_W
    ow = l_rows % OUT_W
    ih = oh[:, None] * SH - PH + ki[None, :] * DH
    iw = ow[:, None] * SW - PW + kj[None, :] * DW
    mask = row_ok[:, None] & (offs_k[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = (x_ptr + n_rows.to(tl.int64)[:, None] * sxn + cin.to(tl.int64)[None, :] * sxc
            + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_grads(g_ptr, n_rows, l_rows, row_ok, offs_c, grp, OUT_PER_GROUP, sgn, sgc, sgl):
    """Output-gradient tile ``G[rows, c]`` ``[BLOCK_L, BLOCK_C]``."""
    ch = grp * OUT_PER_GROUP + offs_c
    ptrs = g_ptr + n_rows.to(tl.int64)[:, None] * sgn + ch.to(tl.int64)[None, :] * sgc + l_rows.to(tl.int64)[:, None] * sgl
    mask = row_ok[:, None] & (offs_c[None, :] < OUT_PER_GROUP)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.autotune(configs=_configs(*_TILE_OPTIONS), key=["L", "K", "OUT_PER_GROUP", "KH", "KW"],
                 reset_to_zero=["group_grad_ptr"])
@triton.jit
def _direct_kernel(x_ptr, g_ptr, order_ptr, seg_ptr, sq_partial_ptr, group_grad_ptr,
                   B, L, K, OUT_PER_GROUP, COUT, NUM_GROUPS, SAMPLES_PER_SPLIT,
                   H, W, OUT_W, IN_PER_GROUP, sxn, sxc, sxh, sxw, sgn, sgc, sgl,
                   SH, SW, PH, PW, DH, DW,
                   KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    c_tiles = tl.cdiv(OUT_PER_GROUP, BLOCK_C)
    grp = pid_c // c_tiles
    offs_c = (pid_c % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = offs_c < OUT_PER_GROUP
    s_lo = pid_s * SAMPLES_PER_SPLIT
    s_hi = tl.minimum(s_lo + SAMPLES_PER_SPLIT, B)
    for gi in range(NUM_GROUPS):
        lo = tl.maximum(tl.load(seg_ptr + gi), s_lo)
        hi = tl.minimum(tl.load(seg_ptr + gi + 1), s_hi)
        acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
        for p in range(lo, hi):
            n = tl.load(order_ptr + p)
            n_rows = tl.zeros((BLOCK_L,), dtype=tl.int64) + n
            prod = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                l_rows = l0 + tl.arange(0, BLOCK_L)
                row_ok = l_rows < L
                gt = _load_grads(g_ptr, n_rows, l_rows, row_ok, offs_c, grp, OUT_PER_GROUP, sgn, sgc, sgl)
                u = _load_patches(x_ptr, n_rows, l_rows, row_ok, offs_k, grp, K, H, W, OUT_W, IN_PER_GROUP,
                                  sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, KH, KW)
                prod = tl.dot(tl.trans(gt), u, prod, input_precision=PRECISION)
            sq = tl.sum(prod * prod, axis=1)  # this K tile's share of ||P[c]||^2
            out = sq_partial_ptr + (pid_k.to(tl.int64) * B + n) * COUT + grp * OUT_PER_GROUP + offs_c
            tl.store(out, sq, mask=c_ok)
            acc += prod
        if hi > lo:
            ptrs = (group_grad_ptr + (gi * COUT + grp * OUT_PER_GROUP + offs_c).to(tl.int64)[:, None] * K
                    + offs_k[None, :])
            mask = c_ok[:, None] & (offs_k[None, :] < K)
            if ATOMIC:
                tl.atomic_add(ptrs, acc, mask=mask)
            else:
                tl.store(ptrs, acc, mask=mask)


@triton.autotune(configs=_configs(*_TILE_OPTIONS), key=["L", "K", "OUT_PER_GROUP", "KH", "KW"])
@triton.jit
def _group_gemm_kernel(x_ptr, g_ptr, order_ptr, seg_ptr, group_grad_ptr,
                       L, K, OUT_PER_GROUP, COUT,
                       H, W, OUT_W, IN_PER_GROUP, sxn, sxc, sxh, sxw, sgn, sgc, sgl,
                       SH, SW, PH, PW, DH, DW,
                       KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    gi = tl.program_id(2)
    c_tiles = tl.cdiv(OUT_PER_GROUP, BLOCK_C)
    grp = pid_c // c_tiles
    offs_c = (pid_c % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    lo = tl.load(seg_ptr + gi)
    rows = (tl.load(seg_ptr + gi + 1) - lo) * L
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    # Rows of the segmented GEMM are (sample of group gi, position): K-dim of the product.
    for r0 in range(0, rows, BLOCK_L):
        offs_r = r0 + tl.arange(0, BLOCK_L)
        row_ok = offs_r < rows
        n_rows = tl.load(order_ptr + lo + offs_r // L, mask=row_ok, other=0)
        l_rows = offs_r % L
        gt = _load_grads(g_ptr, n_rows, l_rows, row_ok, offs_c, grp, OUT_PER_GROUP, sgn, sgc, sgl)
        u = _load_patches(x_ptr, n_rows, l_rows, row_ok, offs_k, grp, K, H, W, OUT_W, IN_PER_GROUP,
                          sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, KH, KW)
        acc = tl.dot(tl.trans(gt), u, acc, input_precision=PRECISION)
    ptrs = group_grad_ptr + (gi * COUT + grp * OUT_PER_GROUP + offs_c).to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, acc, mask=(offs_c < OUT_PER_GROUP)[:, None] & (offs_k[None, :] < K))


@triton.jit
def _gram_kernel(x_ptr, gram_ptr, L, K, GROUPS, H, W, OUT_W, IN_PER_GROUP, sxn, sxc, sxh, sxw,
                 SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """gram[n * groups + grp] = U_n U_n^T ``[L, L]`` for one (BLOCK_L x BLOCK_L) tile."""
    pid = tl.program_id(0)
    n = pid // GROUPS
    grp = pid % GROUPS
    rows_a = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_b = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    n_rows = tl.zeros((BLOCK_L,), dtype=tl.int64) + n
    acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ua = _load_patches(x_ptr, n_rows, rows_a, rows_a < L, offs_k, grp, K, H, W, OUT_W, IN_PER_GROUP,
                           sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, KH, KW)
        ub = _load_patches(x_ptr, n_rows, rows_b, rows_b < L, offs_k, grp, K, H, W, OUT_W, IN_PER_GROUP,
                           sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, KH, KW)
        acc = tl.dot(ua, tl.trans(ub), acc, input_precision=PRECISION)
    ptrs = gram_ptr + pid.to(tl.int64) * L * L + rows_a[:, None] * L + rows_b[None, :]
    tl.store(ptrs, acc, mask=(rows_a[:, None] < L) & (rows_b[None, :] < L))


@triton.jit
def _gram_contract_kernel(gram_ptr, g_ptr, grad_sq_ptr, L, OUT_PER_GROUP, COUT, GROUPS, sgn, sgc, sgl,
                          PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_sq[n, c] = sum_{l, m} g[n, l, c] gram[l, m] g[n, m, c] for one channel tile."""
    pid = tl.program_id(0)
    n = pid // GROUPS
    grp = pid % GROUPS
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_rows = tl.zeros((BLOCK_L,), dtype=tl.int64) + n
    sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for a0 in range(0, L, BLOCK_L):
        rows_a = a0 + tl.arange(0, BLOCK_L)
        kg = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for b0 in range(0, L, BLOCK_L):
            rows_b = b0 + tl.arange(0, BLOCK_L)
            gram = tl.load(gram_ptr + pid.to(tl.int64) * L * L + rows_a[:, None] * L + rows_b[None, :],
                           mask=(rows_a[:, None] < L) & (rows_b[None, :] < L), other=0.0)
            gb = _load_grads(g_ptr, n_rows, rows_b, rows_b < L, offs_c, grp, OUT_PER_GROUP, sgn, sgc, sgl)
            kg = tl.dot(gram, gb.to(tl.float32), kg, input_precision=PRECISION)
        ga = _load_grads(g_ptr, n_rows, rows_a, rows_a < L, offs_c, grp, OUT_PER_GROUP, sgn, sgc, sgl)
        sq += tl.sum(kg * ga.to(tl.float32), axis=0)
    tl.store(grad_sq_ptr + n.to(tl.int64) * COUT + grp * OUT_PER_GROUP + offs_c, sq, mask=offs_c < OUT_PER_GROUP)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _geometry_args(geo: Geometry):
    return (geo.height, geo.width, geo.out_width, geo.in_per_group, *geo.x_strides, *geo.g_strides,
            geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def grad_stats(x: torch.Tensor, grad_out: torch.Tensor, geo: Geometry, group_ids: torch.Tensor,
               num_groups: int, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``grad_sq [B, Cout]`` and ``group_grad [G, Cout, K]`` (float32) for one layer call."""
    if x.dtype == torch.float64:
        raise TypeError("the triton backend takes float16/bfloat16/float32 inputs; use backend='torch' for float64")
    batch, length, patch, cout = geo.batch, geo.positions, geo.patch_size, geo.out_channels
    device = x.device
    order, seg = sort_by_group(group_ids, num_groups)
    group_grad = torch.zeros(num_groups, cout, patch, device=device, dtype=torch.float32)
    grad_sq = torch.empty(batch, cout, device=device, dtype=torch.float32)
    if batch == 0:
        return grad_sq, group_grad
    if x.dtype != grad_out.dtype:  # e.g. autocast: fp32 input saved, bf16 gradient
        raise TypeError(f"x ({x.dtype}) and grad_out ({grad_out.dtype}) must share a dtype")
    precision = _precision(x.dtype)
    geo_args = _geometry_args(geo)
    common = dict(KH=geo.kh, KW=geo.kw, PRECISION=precision)
    if method == "direct":
        # Enough programs to fill the GPU: split the sorted samples when channel tiles are few.
        tiles = geo.groups * triton.cdiv(geo.out_per_group, 64) * triton.cdiv(patch, 64)
        splits = max(1, min(batch, (2 * _num_sms(device)) // max(tiles, 1)))
        per_split = triton.cdiv(batch, splits)
        splits = triton.cdiv(batch, per_split)
        max_k_tiles = triton.cdiv(patch, 16)
        sq_partial = torch.zeros(max_k_tiles, batch, cout, device=device, dtype=torch.float32)

        def grid(meta):
            return (geo.groups * triton.cdiv(geo.out_per_group, meta["BLOCK_C"]),
                    triton.cdiv(patch, meta["BLOCK_K"]), splits)

        _direct_kernel[grid](x, grad_out, order, seg, sq_partial, group_grad, batch, length, patch,
                             geo.out_per_group, cout, num_groups, per_split, *geo_args,
                             ATOMIC=splits > 1, **common)
        torch.sum(sq_partial, 0, out=grad_sq)
        return grad_sq, group_grad

    block_l = 16 if length <= 16 else 32
    gram = torch.empty(batch * geo.groups, length, length, device=device, dtype=torch.float32)
    l_tiles = triton.cdiv(length, block_l)
    _gram_kernel[(batch * geo.groups, l_tiles, l_tiles)](
        x, gram, length, patch, geo.groups, geo.height, geo.width, geo.out_width, geo.in_per_group,
        *geo.x_strides, geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw, BLOCK_L=block_l, BLOCK_K=32, **common)
    block_c = 32 if geo.out_per_group > 16 else 16
    _gram_contract_kernel[(batch * geo.groups, triton.cdiv(geo.out_per_group, block_c))](
        gram, grad_out, grad_sq, length, geo.out_per_group, cout, geo.groups, *geo.g_strides,
        PRECISION=_precision(torch.float32), BLOCK_L=block_l, BLOCK_C=block_c)

    def grid_gemm(meta):
        return (geo.groups * triton.cdiv(geo.out_per_group, meta["BLOCK_C"]), triton.cdiv(patch, meta["BLOCK_K"]),
                num_groups)

    _group_gemm_kernel[grid_gemm](x, grad_out, order, seg, group_grad, length, patch, geo.out_per_group, cout,
                                  *geo_args, **common)
    return grad_sq, group_grad


def _interpreter_safe(x: torch.Tensor, grad_out: torch.Tensor):
    if _INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter's tl.dot mis-computes bf16 operands (numpy has no bf16); the upcast is
        # exact, so CPU runs still check everything but the bf16 MMA, which GPU tests cover.
        return x.float(), grad_out.float()
    return x, grad_out


def linear_grad_stats_triton(x, grad_out, group_ids, num_groups, method):
    """x ``[B, T, D]``, grad_out ``[B, T, C]`` -> ``grad_sq [B, C]``, ``group_grad [G, C, D]``."""
    x, grad_out = _interpreter_safe(x, grad_out)
    return grad_stats(x, grad_out, linear_geometry(x, grad_out), group_ids, num_groups, method)


def conv2d_grad_stats_triton(x, grad_out, kernel_size, stride, padding, dilation, groups, group_ids, num_groups, method):
    """x ``[B, Cin, H, W]``, grad_out ``[B, Cout, Ho, Wo]`` -> ``grad_sq [B, Cout]``, ``group_grad [G, *W.shape]``."""
    x, grad_out = _interpreter_safe(x, grad_out)
    grad_out3 = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)
    geo = conv_geometry(x, grad_out3, grad_out.shape[3], kernel_size, stride, padding, dilation, groups)
    grad_sq, group_grad = grad_stats(x, grad_out3, geo, group_ids, num_groups, method)
    return grad_sq, group_grad.view(num_groups, geo.out_channels, geo.in_per_group, *kernel_size)
