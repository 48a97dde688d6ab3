"""Helpers shared by the ops: input validation, backend choice, the path cost model."""
from __future__ import annotations

from typing import Tuple

import torch

from spurfast._extension import load_extension, require_extension, warn_once

BACKENDS = ("auto", "torch", "cpp")
METHODS = ("auto", "direct", "gram")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to a concrete backend for tensors on ``device``.

    ``auto`` picks the fastest available backend and falls back to ``torch`` with one
    warning; naming a backend that cannot run raises with the reason.
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
    # auto
    if device.type == "cpu":
        if load_extension() is not None:
            return "cpp"
        from spurfast import _extension

        warn_once(
            "auto-cpu",
            f"spurfast: compiled extension unavailable ({_extension._C_error!r}); "
            "falling back to the plain-torch backend, which materialises per-sample gradients.",
        )
        return "torch"
    warn_once(
        f"auto-{device.type}",
        f"spurfast: no fused kernel for {device.type} tensors in this build; "
        "falling back to the plain-torch backend, which materialises per-sample gradients.",
    )
    return "torch"


def check_group_ids(group_ids: torch.Tensor, batch: int, num_groups: int, name: str = "group_ids") -> torch.Tensor:
    """Validate group ids once at the boundary and return them as int64."""
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(group_ids).__name__}")
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one id per sample), got {list(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {group_ids.dtype}")
    if batch > 0:
        lo, hi = int(group_ids.min()), int(group_ids.max())
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


def choose_method(tokens: int, out_features: int, in_features: int) -> str:
    """Pick the cheaper way to get ``grad_sq`` for one (sample, layer) of shape T x C x D.

    ``direct`` forms each sample's C x D gradient once (the GEMM that the weight gradient
    needs anyway, so group sums come free) and reads its rows; ``gram`` forms the T x T
    Gram matrix of the sample's inputs and contracts it with the output gradient, and
    then still pays one GEMM for the group sums. Costs in multiply-adds, with writing and
    re-reading a per-sample gradient element counted as a few multiply-adds.
    """
    t, c, d = tokens, out_features, in_features
    if t == 1:
        return "direct"  # rank-one: grad_sq = g^2 * ||x||^2, no per-sample product at all
    write_cost = 8
    direct = t * c * d + write_cost * c * d
    gram = t * t * (d + c) + t * c * d
    return "gram" if gram < direct else "direct"


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
