"""Triton kernels of the masked Adam/AdamW and SGD steps (lazily imported).

One launch covers every tensor of a (device, dtype) group: the tensors' addresses sit in
int64 tables that a program casts back to pointers, and each program takes one block of
``BLOCK`` consecutive elements of one tensor (a block table maps program -> tensor, start).
An element's row is its flat index // D; a program whose elements all lie in masked rows
returns before it loads anything, and inside a block masked elements are masked out of every
load and store. Step counts are incremented beforehand for the active rows (two foreach adds),
so that the programs sharing a row all read its new count.

Adam's bias corrections ``1 - beta^step`` are computed per element in float32 from
``step * ln(beta)`` by a Taylor series of ``-expm1`` for small arguments (``1 - exp`` loses
about 1e-4 relative to cancellation at step 1 with beta2 = 0.999), else ``1 - exp``: a
relative error of a few 1e-7 against the double-precision bias corrections of the C++
kernel and torch.
"""
# No `from __future__ import annotations` here: it turns `tl.constexpr` annotations into strings,
# which the Triton 3.0 interpreter does not recognise as constexpr.
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 1024
_TABLE_CACHE: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) for x <= 0, without cancellation near 0."""
    # -expm1(x) = -x (1 + x/2 (1 + x/3 (... (1 + x/12)))) for |x| < 1: truncation below 1e-9 relative.
    series = 1.0 + x / 12.0
    series = 1.0 + x / 11.0 * series
    series = 1.0 + x / 10.0 * series
    series = 1.0 + x / 9.0 * series
    series = 1.0 + x / 8.0 * series
    series = 1.0 + x / 7.0 * series
    series = 1.0 + x / 6.0 * series
    series = 1.0 + x / 5.0 * series
    series = 1.0 + x / 4.0 * series
    series = 1.0 + x / 3.0 * series
    series = 1.0 + x / 2.0 * series
    return tl.where(x > -1.0, -x * series, 1.0 - tl.exp(x))


@triton.jit
def _block_rows(block_tensor_ptr, block_start_ptr, numel_ptr, row_len_ptr, active_addr_ptr, BLOCK: tl.constexpr):
    """(tensor index, element offsets, their rows, live: in range and in an active row) of this block."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    numel = tl.load(numel_ptr + t)
    row_len = tl.load(row_len_ptr + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    live = offs < numel
    rows = offs // row_len
    active_addr = tl.load(active_addr_ptr + t)
    if active_addr != 0:
        active = tl.load(active_addr.to(tl.pointer_type(tl.int8)) + rows, mask=live, other=0)
        live = live & (active != 0)
    return t, offs, rows, live


@triton.jit
def _masked_adam_kernel(
    block_tensor_ptr, block_start_ptr, numel_ptr, row_len_ptr,
    p_addr_ptr, g_addr_ptr, m_addr_ptr, v_addr_ptr, vmax_addr_ptr, step_addr_ptr, active_addr_ptr,
    p_like_ptr, s_like_ptr,
    lr, ln_beta1, ln_beta2, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, sign,
    AMSGRAD: tl.constexpr, L2: tl.constexpr, DECOUPLED: tl.constexpr, LERP_LOW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, rows, live = _block_rows(block_tensor_ptr, block_start_ptr, numel_ptr, row_len_ptr, active_addr_ptr,
                                      BLOCK)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        return  # every row of this block is masked: nothing is loaded
    p_ptr = tl.load(p_addr_ptr + t).to(p_like_ptr.dtype)
    g_ptr = tl.load(g_addr_ptr + t).to(p_like_ptr.dtype)
    m_ptr = tl.load(m_addr_ptr + t).to(s_like_ptr.dtype)
    v_ptr = tl.load(v_addr_ptr + t).to(s_like_ptr.dtype)
    step_ptr = tl.load(step_addr_ptr + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr + rows, mask=live, other=1.0)  # already incremented
    bc1 = _one_minus_exp(step * ln_beta1)
    bc2 = _one_minus_exp(step * ln_beta2)
    neg_step_size = -lr / bc1
    bc2_sqrt = tl.sqrt(bc2)

    param = tl.load(p_ptr + offs, mask=live, other=0.0).to(tl.float32)
    grad = sign * tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
    if L2:
        grad = grad + weight_decay * param
    if DECOUPLED:
        param = param * decay
    m = tl.load(m_ptr + offs, mask=live, other=0.0)
    if LERP_LOW:
        m = m + lerp_weight * (grad - m)
    else:
        m = grad - (grad - m) * (1.0 - lerp_weight)
    v = tl.load(v_ptr + offs, mask=live, other=0.0) * beta2 + one_minus_beta2 * grad * grad
    tl.store(m_ptr + offs, m, mask=live)
    tl.store(v_ptr + offs, v, mask=live)
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_addr_ptr + t).to(s_like_ptr.dtype)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=live, other=0.0), v)
        tl.store(vmax_ptr + offs, v, mask=live)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    param = param + neg_step_size * m / denom
    tl.store(p_ptr + offs, param.to(p_like_ptr.dtype.element_ty), mask=live)


@triton.jit
def _masked_sgd_kernel(
    block_tensor_ptr, block_start_ptr, numel_ptr, row_len_ptr,
    p_addr_ptr, g_addr_ptr, buf_addr_ptr, step_addr_ptr, active_addr_ptr,
    p_like_ptr, s_like_ptr,
    neg_lr, momentum, one_minus_dampening, weight_decay, sign,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, L2: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, rows, live = _block_rows(block_tensor_ptr, block_start_ptr, numel_ptr, row_len_ptr, active_addr_ptr,
                                      BLOCK)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        return
    p_ptr = tl.load(p_addr_ptr + t).to(p_like_ptr.dtype)
    g_ptr = tl.load(g_addr_ptr + t).to(p_like_ptr.dtype)
    param = tl.load(p_ptr + offs, mask=live, other=0.0).to(tl.float32)
    grad = sign * tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
    if L2:
        grad = grad + weight_decay * param
    if MOMENTUM:
        buf_ptr = tl.load(buf_addr_ptr + t).to(s_like_ptr.dtype)
        step_ptr = tl.load(step_addr_ptr + t).to(tl.pointer_type(tl.float32))
        first = tl.load(step_ptr + rows, mask=live, other=0.0) == 1.0  # a row's first update: buffer = grad
        buf = tl.load(buf_ptr + offs, mask=live & (first == 0), other=0.0)
        buf = tl.where(first, grad, buf * momentum + one_minus_dampening * grad)
        tl.store(buf_ptr + offs, buf, mask=live)
        if NESTEROV:
            grad = grad + momentum * buf
        else:
            grad = buf
    param = param + neg_lr * grad
    tl.store(p_ptr + offs, param.to(p_like_ptr.dtype.element_ty), mask=live)


def _blocks(params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_tensor [NB] int32, block_start [NB] int64, numel [T] int64, row_len [T] int64), cached by shapes."""
    device = params[0].device
    key = (device, tuple(tuple(p.shape) for p in params))
    if key not in _TABLE_CACHE:
        tensor_ids: List[torch.Tensor] = []
        starts: List[torch.Tensor] = []
        numel, row_len = [], []
        for t, p in enumerate(params):
            n = p.numel()
            rows = 1 if p.dim() == 0 else p.shape[0]
            numel.append(n)
            row_len.append(max(1, n // max(1, rows)))
            blocks = triton.cdiv(n, BLOCK)
            tensor_ids.append(torch.full((blocks,), t, dtype=torch.int32))
            starts.append(torch.arange(blocks, dtype=torch.int64) * BLOCK)
        tables = (torch.cat(tensor_ids), torch.cat(starts), torch.tensor(numel), torch.tensor(row_len))
        if len(_TABLE_CACHE) > 64:  # a long-lived process with many optimizers: keep the cache small
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = tuple(x.to(device) for x in tables)
    return _TABLE_CACHE[key]


def _addresses(device: torch.device, *lists: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """[len(lists), T] int64 data pointers (0 for None) on ``device``."""
    table = torch.tensor([[0 if x is None else x.data_ptr() for x in values] for values in lists], dtype=torch.int64)
    return table.to(device, non_blocking=True) if device.type != "cpu" else table


def _increment_steps(steps: Sequence[torch.Tensor], active: Sequence[Optional[torch.Tensor]]) -> None:
    every = [s for s, a in zip(steps, active) if a is None]
    masked = [(s, a) for s, a in zip(steps, active) if a is not None]
    if every:
        torch._foreach_add_(every, 1.0)
    if masked:
        torch._foreach_add_([s for s, _ in masked], [a for _, a in masked])


def masked_adam_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, active, lr, beta1, beta2,
                            eps, weight_decay, decoupled_weight_decay, amsgrad, maximize) -> None:
    """The masked Adam/AdamW step of :func:`spurfast.ops.masked_adam_step`, one launch for every tensor
    (one dtype, one device, dense rows, row masks and row step counts; the launcher checks)."""
    if not params:
        return
    if params[0].dtype == torch.float64:
        raise TypeError("the triton backend takes float16/bfloat16/float32 parameters; use backend='torch' for float64")
    _increment_steps(steps, active)
    device = params[0].device
    block_tensor, block_start, numel, row_len = _blocks(params)
    if block_tensor.numel() == 0:
        return
    addr = _addresses(device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params),
                      steps, active)
    lerp_weight = 1.0 - beta1
    _masked_adam_kernel[(block_tensor.numel(),)](
        block_tensor, block_start, numel, row_len, addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6],
        params[0], exp_avgs[0],
        lr, math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
        lerp_weight, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, -1.0 if maximize else 1.0,
        AMSGRAD=bool(amsgrad), L2=bool(weight_decay != 0 and not decoupled_weight_decay),
        DECOUPLED=bool(weight_decay != 0 and decoupled_weight_decay), LERP_LOW=abs(lerp_weight) < 0.5,
        BLOCK=BLOCK, num_warps=4,
    )


def masked_sgd_step_triton(params, grads, momentum_buffers, steps, active, lr, momentum, dampening, weight_decay,
                           nesterov, maximize) -> None:
    """The masked SGD step of :func:`spurfast.ops.masked_sgd_step`, one launch for every tensor."""
    if not params:
        return
    if params[0].dtype == torch.float64:
        raise TypeError("the triton backend takes float16/bfloat16/float32 parameters; use backend='torch' for float64")
    _increment_steps(steps, active)
    device = params[0].device
    block_tensor, block_start, numel, row_len = _blocks(params)
    if block_tensor.numel() == 0:
        return
    has_momentum = momentum != 0
    buffers = momentum_buffers if has_momentum else [None] * len(params)
    addr = _addresses(device, params, grads, buffers, steps, active)
    _masked_sgd_kernel[(block_tensor.numel(),)](
        block_tensor, block_start, numel, row_len, addr[0], addr[1], addr[2], addr[3], addr[4],
        params[0], buffers[0] if has_momentum else steps[0],
        -lr, momentum, 1.0 - dampening, weight_decay, -1.0 if maximize else 1.0,
        MOMENTUM=bool(has_momentum), NESTEROV=bool(nesterov), L2=bool(weight_decay != 0), BLOCK=BLOCK, num_warps=4,
    )
