"""Losses of the dense/masked training framework (You et al. 2025, Part II).

* :func:`nt_xent` -- the normalized-temperature cross-entropy of SimCLR between two views
  ``a``, ``b`` ``[B, D]`` of a batch.
* :func:`nt_xent_reference` -- the same, as a literal loop over anchors (float64; for tests).
* :func:`dense_masked_loss` -- the framework's objective
  ``nt_xent(sg(z_dense), z_masked) + nt_xent(z_dense, sg(z_masked)) + ce_weight * CE(dense logits, y)``
  with ``sg`` the stop-gradient and ``z`` the penultimate features (the paper's text), the
  logits, or the softmax outputs (the paper's public code).

**Negatives convention (SimCLR).** The 2B vectors ``a_1..a_B, b_1..b_B`` are all anchors.
For anchor ``a_i`` the positive is ``b_i``; its negatives are the other 2B - 2 vectors
(``a_j`` and ``b_j`` for every ``j != i``); the anchor itself is left out of the softmax.
Likewise for ``b_i``. The loss is the mean over the 2B anchors of
``-log( exp(s(i, pos) / T) / sum_{k != i} exp(s(i, k) / T) )`` with ``s`` the cosine
similarity. It is symmetric, ``nt_xent(a, b) == nt_xent(b, a)``, and a batch of one
(``B = 1``) has no negatives, so its loss is exactly 0.

**The stop-gradients.** Because :func:`nt_xent` is symmetric, the two stop-gradient terms of
the objective have, together, the gradient of a single ``nt_xent(z_dense, z_masked)`` without
stop-gradients (each term sends the gradient of one argument), while the value is twice that
loss. :func:`dense_masked_loss` computes the objective exactly as written; the test suite
checks this identity.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["nt_xent", "nt_xent_reference", "dense_masked_loss", "DenseMaskedLoss", "CONTRAST_ON"]

#: What the contrastive terms of :func:`dense_masked_loss` compare: the penultimate features
#: (the paper's text), the logits, or the softmax outputs (the paper's public code).
CONTRAST_ON = ("features", "logits", "softmax")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_views(a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, D], got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must be a non-empty 2-D tensor [B, D], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape [B, D], got {list(a.shape)} and {list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    # fp16/bf16 views are compared in float32; float64 stays float64 (references, gradcheck).
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> float32 (accumulate in float32); float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) between two views of a batch; see the module docstring for the negatives.

    Args:
        a, b: ``[B, D]`` floating-point views; row ``i`` of ``a`` and row ``i`` of ``b`` are a
            positive pair. Each row is L2-normalised (a zero row stays zero, similarity 0), so
            the loss does not depend on the rows' scale.
        temperature: ``T > 0`` dividing the cosine similarities (the paper's 0.5).

    Returns:
        A scalar: the mean over the 2B anchors, in float32 (float64 if an input is float64).

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(nt_xent(a, a).item(), 4)  # each anchor: positive cos 1, two negatives cos 0
        0.2395
        >>> round(math.log(1 + 2 * math.exp(-1 / 0.5)), 4)  # -log(e^2 / (e^2 + 1 + 1))
        0.2395
        >>> bool(nt_xent(a, a) < nt_xent(a, a.flip(0)))  # swapped pairs cost more
        True
    """
    _check_views(a, b)
    temperature = _check_temperature(temperature)
    batch = a.shape[0]
    dtype = _compute_dtype(a, b)
    views = F.normalize(torch.cat([a, b], dim=0).to(dtype), dim=1)  # [2B, D], unit rows
    logits = views @ views.t() / temperature  # [2B, 2B] cosine / T
    self_pair = torch.eye(2 * batch, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pair, float("-inf"))  # an anchor is not its own negative
    index = torch.arange(batch, device=logits.device)
    positives = torch.cat([index + batch, index])  # [2B]: a_i <-> b_i
    return F.cross_entropy(logits, positives)


def nt_xent_reference(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """:func:`nt_xent` written as a loop over the 2B anchors, in float64 (slow; for tests).

    Example:
        >>> a, b = torch.randn(3, 4), torch.randn(3, 4)
        >>> torch.allclose(nt_xent_reference(a, b), nt_xent(a.double(), b.double()))
        True
    """
    _check_views(a, b)
    temperature = _check_temperature(temperature)
    batch = a.shape[0]
    views = [v.double() for v in torch.cat([a, b], dim=0)]  # 2B rows

    def cosine(u, v):
        nu, nv = u.norm(), v.norm()
        return (u @ v) / (nu * nv) if nu > 0 and nv > 0 else u.new_zeros(())

    total = a.new_zeros((), dtype=torch.float64)
    for i in range(2 * batch):
        positive = (i + batch) % (2 * batch)
        numerator = torch.exp(cosine(views[i], views[positive]) / temperature)
        denominator = sum(torch.exp(cosine(views[i], views[k]) / temperature) for k in range(2 * batch) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * batch)


class DenseMaskedLoss(NamedTuple):
    """The framework's objective and its parts (scalars).

    ``total = contrastive + ce_weight * cross_entropy``; ``contrastive`` is the sum of the two
    stop-gradient NT-Xent terms; ``cross_entropy`` is the dense branch's mean cross-entropy.
    """

    total: torch.Tensor
    contrastive: torch.Tensor
    cross_entropy: torch.Tensor


def dense_masked_loss(
    dense_logits: torch.Tensor,
    masked_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    dense_features: Optional[torch.Tensor] = None,
    masked_features: Optional[torch.Tensor] = None,
    on: str = "features",
    ce_weight: float = 0.2,
    temperature: float = 0.5,
) -> DenseMaskedLoss:
    """The dense/masked objective of You et al. (2025):
    ``nt_xent(sg(z_dense), z_masked) + nt_xent(z_dense, sg(z_masked)) + ce_weight * CE(dense_logits, labels)``.

    Args:
        dense_logits: ``[B, C]`` logits of the dense branch (the model as it is).
        masked_logits: ``[B, C]`` logits of the masked branch (same weights, masked entries
            zeroed); needed for ``on="logits"``/``"softmax"``, may be ``None`` for ``"features"``.
        labels: ``[B]`` integer class labels.
        dense_features, masked_features: ``[B, D]`` penultimate features of the two branches
            (the classifier's input); needed for ``on="features"``.
        on: what ``z`` is: ``"features"`` (the paper's text, default), ``"logits"``, or
            ``"softmax"`` (``softmax(logits)``, what the paper's public code compares).
        ce_weight: weight of the dense cross-entropy (the paper's 0.2).
        temperature: NT-Xent temperature (the paper's 0.5).

    Returns:
        :class:`DenseMaskedLoss` ``(total, contrastive, cross_entropy)``; call
        ``total.backward()``.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> logits, feats = torch.randn(4, 2, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        >>> labels = torch.tensor([0, 1, 1, 0])
        >>> parts = dense_masked_loss(logits, None, labels, dense_features=feats, masked_features=feats * 0.5)
        >>> torch.allclose(parts.total, parts.contrastive + 0.2 * parts.cross_entropy)
        True
        >>> parts.total.backward(); feats.grad.shape
        torch.Size([4, 8])
    """
    if on not in CONTRAST_ON:
        raise ValueError(f"on must be one of {CONTRAST_ON}, got {on!r}")
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not (
        math.isfinite(ce_weight) and ce_weight >= 0
    ):
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    temperature = _check_temperature(temperature)
    if not isinstance(dense_logits, torch.Tensor) or dense_logits.dim() != 2 or not dense_logits.is_floating_point():
        raise ValueError(f"dense_logits must be a float tensor [B, C], got {_describe(dense_logits)}")
    batch = dense_logits.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [{batch}], got {_describe(labels)}")
    if on == "features":
        if dense_features is None or masked_features is None:
            raise ValueError("on='features' needs dense_features and masked_features [B, D]")
        dense_z, masked_z = dense_features, masked_features
        name = "dense_features"
    else:
        if masked_logits is None:
            raise ValueError(f"on={on!r} needs masked_logits [B, C]")
        if masked_logits.shape != dense_logits.shape:
            raise ValueError(
                f"masked_logits must have dense_logits' shape {list(dense_logits.shape)}, "
                f"got {_describe(masked_logits)}"
            )
        dense_z, masked_z = dense_logits, masked_logits
        if on == "softmax":
            dense_z, masked_z = _upcast(dense_z).softmax(dim=1), _upcast(masked_z).softmax(dim=1)
        name = "dense_logits"
    if not isinstance(dense_z, torch.Tensor) or dense_z.dim() != 2 or dense_z.shape[0] != batch:
        raise ValueError(f"{name} must be [B={batch}, D], got {_describe(dense_z)}")
    contrastive = nt_xent(dense_z.detach(), masked_z, temperature) + nt_xent(dense_z, masked_z.detach(), temperature)
    cross_entropy = F.cross_entropy(_upcast(dense_logits), labels)
    total = contrastive + float(ce_weight) * cross_entropy
    return DenseMaskedLoss(total, contrastive, cross_entropy)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {list(t.shape)}"
    return type(t).__name__
