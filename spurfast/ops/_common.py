"""Helpers shared by the ops: input validation, backend choice, the path cost model."""
from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Optional, Tuple

import torch

from spurfast._extension import load_extension, require_extension, warn_once

BACKENDS = ("auto", "torch", "cpp", "triton")
METHODS = ("auto", "direct", "gram")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_triton_error: Optional[BaseException] = None
_triton_checked = False


def triton_module(name: str):
    """Import ``spurfast.ops._triton.<name>`` (and so Triton) on first use, with a clear error."""
    global _triton_error, _triton_checked
    try:
        return importlib.import_module(f"spurfast.ops._triton.{name}")
    except ImportError as exc:
        _triton_error, _triton_checked = exc, True
        raise RuntimeError(
            f"spurfast backend 'triton' needs Triton >= 3.0, which could not be imported: {exc!r}. "
            "CUDA builds of torch ship it; or use backend='torch'."
        ) from exc


def triton_importable() -> bool:
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # any failure means the backend is unusable
            _triton_error = exc
    return _triton_error is None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map ``backend`` to a concrete backend for tensors of ``dtype`` on ``device``.

    ``auto`` picks the fastest available backend (``cpp`` on CPU, ``triton`` on CUDA; float64
    always runs on ``torch``) and falls back to ``torch`` with one warning; naming a backend
    that cannot run raises with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        require_extension("cpp")
        return "cpp"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError("backend='triton' takes float16/bfloat16/float32 tensors; use backend='torch' for float64")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        if not triton_importable():
            raise RuntimeError(f"backend='triton' needs Triton >= 3.0, which could not be imported: {_triton_error!r}")
        return "triton"
    # auto
    if dtype == torch.float64:
        return "cpp" if device.type == "cpu" and load_extension() is not None else "torch"
    if device.type == "cpu":
        if load_extension() is not None:
            return "cpp"
        from spurfast import _extension

        warn_once(
            "auto-cpu",
            f"spurfast: C++ extension unavailable ({_extension._C_error}); "
            "falling back to the plain-torch backend, which materialises per-sample gradients.",
        )
        return "torch"
    if device.type == "cuda" and triton_importable():
        return "triton"
    warn_once(
        f"auto-{device.type}",
        f"spurfast: no fused kernel for {device.type} tensors here (triton: {_triton_error!r}); "
        "falling back to the plain-torch backend, which materialises per-sample gradients.",
    )
    return "torch"


def sort_by_group(group_ids: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(order [B], seg [G+1])``: group g's samples are ``order[seg[g]:seg[g+1]]``."""
    order = torch.sort(group_ids, stable=True).indices
    seg = torch.zeros(num_groups + 1, dtype=torch.int64, device=group_ids.device)
    seg[1:] = torch.cumsum(group_counts(group_ids, num_groups), 0)
    return order, seg


def group_counts(group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Samples per group ``[G]`` int64; unlike ``bincount`` on CUDA, no host synchronisation."""
    counts = torch.zeros(num_groups, dtype=torch.int64, device=group_ids.device)
    return counts.scatter_add_(0, group_ids, torch.ones_like(group_ids))


def check_group_ids(
    group_ids: torch.Tensor, batch: int, num_groups: int, name: str = "group_ids", check_range: bool = True
) -> torch.Tensor:
    """Validate group ids once at the boundary and return them as int64.

    ``check_range=False`` skips the value check, which reads the ids back to the host (a
    device synchronisation); callers that validated the ids already pass it.
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(group_ids).__name__}")
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one id per sample), got {list(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {group_ids.dtype}")
    if check_range and batch > 0:
        lo, hi = (int(v) for v in torch.aminmax(group_ids))
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"{name} must lie in [0, num_groups={num_groups}), got values in [{lo}, {hi}]")
    return group_ids.to(torch.int64)


def check_floating(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{name} contains NaN or Inf")


def input_gram_shape(x: torch.Tensor, groups: int) -> Optional[Tuple[int, int]]:
    """``(input positions, input channels)`` of a convolution's input ``x [B, Cin, *spatial]``,
    for :func:`choose_method`'s ``input_gram``: ungrouped convolutions only (their C++ Gram path
    builds the patches' Gram from the input's own), else None."""
    return (math.prod(x.shape[2:]), x.shape[1]) if groups == 1 else None


def choose_method(tokens: int, out_features: int, in_features: int, backend: str = "cpp", linear: bool = True,
                  group_sums: bool = False, input_gram: Optional[Tuple[int, int]] = None) -> str:
    """Pick the cheaper way to get ``grad_sq`` for one (sample, layer) of shape T x C x D.

    ``direct`` forms each sample's C x D gradient once (the GEMM that the weight gradient
    needs anyway, so the weight gradient and group sums come free) and reads its rows;
    ``gram`` forms the T x T Gram matrix of the sample's inputs and contracts it with the
    output gradient, and then still pays one GEMM for the weight gradient. ``group_sums``:
    the caller also keeps per-group sums apart from the weight gradient (as
    :class:`spurfast.NeuronStats` does, deferring them): the Gram path pays one more GEMM
    for them, the direct path adds every product into G sums instead of one.

    Costs in multiply-adds. On CPU a per-sample gradient element is written by a GEMM whose
    reduction is only T deep and re-read; measured on this project's CPU that costs about
    32 multiply-adds' worth per element, and about 96 when it is also added into G sums
    (which no longer stay in cache between chunks of samples). In Triton a product stays in
    registers, but the per-sample dot pads T to the 16-wide MMA tile.

    ``input_gram``: ``(input positions P, input channels)`` of an ungrouped convolution, whose
    C++ Gram path forms the patches' Gram from the input's own ``P x P`` Gram (a gather over
    the kernel taps) instead of from im2col patches.
    """
    t, c, d = tokens, out_features, in_features
    if backend == "triton":
        direct = max(t, 16) * c * d + 4 * c * d
    else:
        if t == 1 and linear:
            return "direct"  # the linear kernel's rank-one case: grad_sq = g^2 * ||x||^2, no product at all
        direct = t * c * d + (96 if group_sums else 32) * c * d
    if input_gram is not None and backend != "triton" and not linear:
        positions, in_channels = input_gram
        taps = max(1, d // max(1, in_channels))
        gram = (positions + 1) ** 2 * in_channels + t * t * (taps + c)
    else:
        gram = t * t * (d + c)
    gram += t * c * d * (2 if group_sums else 1)
    return "gram" if gram < direct else "direct"


def live_window(in_size, out_size, kernel, stride, padding, dilation) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Per spatial dim, the half-open range ``(lo, hi)`` of kernel taps that read the input at
    some output position, when that drops a tap in some dim; else None.

    On a small map most of a padded kernel can fall outside the input at every position (a
    3x3 conv on a 1x1 map: 8 of 9 taps read only padding). The window keeps the same output
    positions with padding ``p - lo * dilation``, so a dim is trimmed only where that padding
    is >= 0 and gives the same output size.
    """
    return _live_window(tuple(in_size), tuple(out_size), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))


def live_padding(padding, window, dilation) -> Tuple[int, ...]:
    """The padding that keeps a :func:`live_window` conv's output positions: ``p - lo * dilation``."""
    return tuple(p - lo * d for p, (lo, _), d in zip(padding, window, dilation))


@functools.lru_cache(maxsize=256)
def _live_window(in_size, out_size, kernel, stride, padding, dilation):
    window = []
    for size, out, k, s, p, d in zip(in_size, out_size, kernel, stride, padding, dilation):
        live = []
        for i in range(k):
            first = max(0, -((i * d - p) // s))  # the first output position reading index >= 0
            if first < out and first * s + i * d - p < size:
                live.append(i)
        lo, hi = (live[0], live[-1] + 1) if live else (0, k)
        live_padding = p - lo * d
        if live_padding < 0 or (size + 2 * live_padding - d * (hi - lo - 1) - 1) // s + 1 != out:
            lo, hi = 0, k
        window.append((lo, hi))
    trimmed = any(w != (0, k) for w, k in zip(window, kernel))
    return tuple(window) if trimmed else None

def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def pair(v, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries, got {v}")
    return v


def reduce_per_sample_grad(per_sample_grad: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    """``(grad_sq [B, C], group_grad [G, C, ...])`` from per-sample gradients ``[B, C, ...]``."""
    grad_sq = per_sample_grad.flatten(2).square().sum(-1)
    group_grad = per_sample_grad.new_zeros((num_groups,) + per_sample_grad.shape[1:])
    group_grad.index_add_(0, group_ids, per_sample_grad)
    return grad_sq, group_grad


def common_dtype(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Promote two floating tensors to one dtype (autocast saves fp32 inputs beside bf16 grads)."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)
