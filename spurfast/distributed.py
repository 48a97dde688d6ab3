"""Reducing NeuronStats' running statistics across the ranks of ``torch.distributed``.

Each rank records its own batches; :meth:`spurfast.NeuronStats.all_reduce` then makes every
rank's running statistics those of all ranks' samples. Only what a rank recorded since the
previous reduction is exchanged (its tables minus the copy kept at that reduction), so it can
be called every epoch without counting anything twice. Sums (counts, ``grad_sq_sum``,
``ablation_sum``, ``group_grad``) are summed; the activation moments are merged from the
ranks' counts, sums and centred squares in two rounds, so the result is the same on every
rank and does not depend on which rank holds which samples (up to float rounding of the
sums). Per-sample tables of the last batch (``last_grad_sq`` ...) stay rank-local.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Moments = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count [G], mean [G, C], m2 [G, C]


def require_initialized() -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "all_reduce() needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun); none is"
        )


def _reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks (a copy; ``t`` unchanged), on ``t``'s device, or CUDA for NCCL."""
    out = t.clone()
    if torch.distributed.get_backend(group) == "nccl" and out.device.type != "cuda":
        cuda = out.cuda()
        torch.distributed.all_reduce(cuda, group=group)
        return cuda.to(t.device)
    torch.distributed.all_reduce(out, group=group)
    return out


def reduce_sum(local: torch.Tensor, base: Optional[torch.Tensor], group=None) -> torch.Tensor:
    """``base + sum over ranks of (local - base)``: what every rank added since ``base``, summed."""
    if base is None:
        return _reduce(local, group)
    return base + _reduce(local - base, group)


def unmerge_moments(total: Moments, base: Moments) -> Moments:
    """The moments of the samples in ``total`` but not in ``base`` (Chan's update solved for
    the second part; float64)."""
    n, mean, m2 = total
    n_a, mean_a, m2_a = base
    n_b = n - n_a
    nf, na, nb = (c.to(mean.dtype).unsqueeze(1) for c in (n, n_a, n_b))
    mean_b = torch.where(nb > 0, (nf * mean - na * mean_a) / nb.clamp(min=1), torch.zeros_like(mean))
    m2_b = m2 - m2_a - (mean_b - mean_a).square() * (na * nb / nf.clamp(min=1))
    return n_b, mean_b, torch.where(nb > 0, m2_b.clamp(min=0), torch.zeros_like(m2_b))


def reduce_moments(local: Moments, group=None) -> Moments:
    """Per-group moments of all ranks' samples from each rank's ``(count, mean, m2)``: counts and
    sums first, then the centred squares about the global mean."""
    count, mean, m2 = local
    n = count.to(mean.dtype).unsqueeze(1)
    total_count = _reduce(count, group)
    total_n = total_count.to(mean.dtype).unsqueeze(1).to(mean.device)
    total_mean = _reduce(n * mean, group) / total_n.clamp(min=1)
    total_m2 = _reduce(m2 + n * (mean - total_mean).square(), group)
    return total_count.to(count.device), total_mean, total_m2


def world_size(group=None) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def rank(group=None) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank(group)
