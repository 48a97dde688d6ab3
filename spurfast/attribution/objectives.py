"""Per-sample objectives to score with: the margin and the cross-entropy.

A network fit to 100 % of its training samples has near-zero loss and loss gradient on them;
what flips a prediction is the margin, the true-class logit minus the largest other logit.
A :class:`~spurfast.NeuronStats` backward of ``margin(logits, labels).sum()`` (with
``loss_reduction="sum"``) records per-sample statistics of the margin; such a backward is
for scoring, never for an optimizer step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("margin", "loss")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``logits[n, labels[n]]`` minus the largest other logit (> 0 iff correct, barring ties).

    Example::

        >>> import torch, spurfast as sf
        >>> sf.margin(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2]))
        tensor([ 1., -2.])
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [B, K] tensor with K >= 2 classes, got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (logits.shape[0],) or labels.is_floating_point():
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape [{logits.shape[0]}], got {shape}")
    labels = labels.long()
    true = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true - others.max(1).values


def per_sample_objective(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """``[B]`` margin or cross-entropy of each sample."""
    if objective == "margin":
        return margin(logits, labels)
    if objective == "loss":
        return F.cross_entropy(logits, labels, reduction="none")
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def check_objective(objective) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective
