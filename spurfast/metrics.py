"""Group metrics: per-group accuracy, worst-group accuracy, average accuracies, memorization gap.

All functions take logits ``[B, C]`` (any float dtype) or predicted labels ``[B]`` (integer),
labels ``[B]`` and group ids ``[B]``, on any device; counts are accumulated on that device and
only the final ``[G]`` vectors come back to the CPU.

* :func:`group_accuracy` -- one call on a whole set of predictions -> :class:`GroupAccuracyResult`.
* :class:`GroupAccuracy` -- the same, accumulated batch by batch (``update`` / ``compute``).
* :func:`evaluate` -- run a model over a dataset (or tensors) in eval mode.
* :func:`memorization_gap` -- per-group train accuracy minus test accuracy.

An empty group has accuracy NaN and is left out of the worst-group and mean accuracies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["GroupAccuracyResult", "GroupAccuracy", "group_accuracy", "memorization_gap", "evaluate"]


@dataclass
class GroupAccuracyResult:
    """Accuracies of one evaluation, in fractions (0..1).

    Attributes:
        group_acc: ``[G]`` float64, accuracy per group (NaN for an empty group).
        group_counts: ``[G]`` int64, samples per group.
        group_correct: ``[G]`` int64, correct predictions per group.
        worst_group_acc: minimum of ``group_acc`` over non-empty groups.
        worst_group: index of that group.
        mean_acc: unweighted mean of ``group_acc`` over non-empty groups.
        avg_acc: overall accuracy (every sample counts once).
        weighted_acc: ``sum_g p_g * group_acc[g]`` with ``p_g`` the training proportions given as
            ``train_group_counts`` (Waterbirds' "average accuracy"); ``None`` when not given.
    """

    group_acc: torch.Tensor
    group_counts: torch.Tensor
    group_correct: torch.Tensor
    worst_group_acc: float
    worst_group: int
    mean_acc: float
    avg_acc: float
    weighted_acc: Optional[float] = None
    group_names: Optional[Sequence[str]] = field(default=None, repr=False)

    @property
    def num_groups(self) -> int:
        return self.group_acc.numel()

    def to_dict(self) -> Dict[str, object]:
        """Plain-Python version (lists and floats; NaN stays NaN), e.g. for JSON."""
        return {
            "group_acc": self.group_acc.tolist(),
            "group_counts": self.group_counts.tolist(),
            "worst_group_acc": self.worst_group_acc,
            "worst_group": self.worst_group,
            "mean_acc": self.mean_acc,
            "avg_acc": self.avg_acc,
            "weighted_acc": self.weighted_acc,
        }


def _check_num_groups(num_groups) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return num_groups


def _correct(logits_or_preds: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    """Validate one batch; return ``(correct [B] bool, group_ids [B] int64)`` on the input's device."""
    for name, t in (("logits_or_preds", logits_or_preds), ("labels", labels), ("group_ids", group_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if labels.dim() != 1 or group_ids.dim() != 1:
        raise ValueError(
            f"labels and group_ids must be 1-D [B], got shapes {list(labels.shape)} and {list(group_ids.shape)}"
        )
    if labels.is_floating_point() or group_ids.is_floating_point():
        raise ValueError(f"labels and group_ids must be integer tensors, got {labels.dtype} and {group_ids.dtype}")
    if logits_or_preds.dim() == 2 and logits_or_preds.is_floating_point():
        preds = logits_or_preds.argmax(dim=1)  # [B]
    elif logits_or_preds.dim() == 1 and not logits_or_preds.is_floating_point():
        preds = logits_or_preds
    else:
        raise ValueError(
            "logits_or_preds must be float logits [B, C] or integer predictions [B], got "
            f"{logits_or_preds.dtype} of shape {list(logits_or_preds.shape)}"
        )
    b = labels.shape[0]
    if preds.shape[0] != b or group_ids.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: logits_or_preds {list(logits_or_preds.shape)}, labels {list(labels.shape)}, "
            f"group_ids {list(group_ids.shape)}"
        )
    group_ids = group_ids.to(device=preds.device, dtype=torch.int64)
    if b and (int(group_ids.min()) < 0 or int(group_ids.max()) >= num_groups):
        raise ValueError(
            f"group_ids must lie in [0, {num_groups}), got range [{int(group_ids.min())}, {int(group_ids.max())}]"
        )
    correct = preds == labels.to(preds.device)
    return correct, group_ids


def _result(
    correct: torch.Tensor, counts: torch.Tensor, train_group_counts=None, group_names=None
) -> GroupAccuracyResult:
    """Build the result from per-group ``correct`` and ``counts`` ([G] int64, any device)."""
    correct, counts = correct.cpu().long(), counts.cpu().long()
    num_groups = counts.numel()
    group_acc = correct.double() / counts.double()  # 0/0 -> NaN for empty groups
    present = counts > 0
    if present.any():
        accs = group_acc[present]
        worst = int(torch.nonzero(present)[accs.argmin()].item())
        worst_acc, mean_acc = float(accs.min()), float(accs.mean())
        avg_acc = float(correct.sum()) / float(counts.sum())
    else:
        worst, worst_acc, mean_acc, avg_acc = -1, math.nan, math.nan, math.nan
    weighted = None
    if train_group_counts is not None:
        weights = torch.as_tensor(train_group_counts, dtype=torch.float64).flatten().cpu()
        if weights.numel() != num_groups or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"train_group_counts must hold {num_groups} non-negative counts with a positive sum, "
                f"got {weights.tolist()}"
            )
        # Groups absent from the evaluation set cannot be weighted in; renormalize over the rest.
        w = weights * present.double()
        weighted = float((w * torch.nan_to_num(group_acc)).sum() / w.sum()) if w.sum() > 0 else math.nan
    return GroupAccuracyResult(
        group_acc=group_acc,
        group_counts=counts,
        group_correct=correct,
        worst_group_acc=worst_acc,
        worst_group=worst,
        mean_acc=mean_acc,
        avg_acc=avg_acc,
        weighted_acc=weighted,
        group_names=group_names,
    )


def group_accuracy(
    logits_or_preds: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    train_group_counts: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> GroupAccuracyResult:
    """Per-group, worst-group and average accuracies of one set of predictions.

    Args:
        logits_or_preds: ``[B, C]`` float logits (argmax is taken) or ``[B]`` integer predictions.
        labels: ``[B]`` integer true labels.
        group_ids: ``[B]`` integer group ids in ``[0, num_groups)``.
        num_groups: number of groups ``G``.
        train_group_counts: ``[G]`` training counts per group; gives ``weighted_acc``.

    Example:
        >>> preds = torch.tensor([0, 0, 1, 1, 1, 0])
        >>> labels = torch.tensor([0, 1, 1, 1, 1, 1])
        >>> groups = torch.tensor([0, 0, 3, 3, 3, 2])
        >>> r = group_accuracy(preds, labels, groups, num_groups=4, train_group_counts=[3, 0, 1, 6])
        >>> r.group_acc.tolist()
        [0.5, nan, 0.0, 1.0]
        >>> r.worst_group_acc, r.worst_group, r.mean_acc, round(r.avg_acc, 4), r.weighted_acc
        (0.0, 2, 0.5, 0.6667, 0.75)
    """
    num_groups = _check_num_groups(num_groups)
    correct, group_ids = _correct(logits_or_preds, labels, group_ids, num_groups)
    counts = torch.bincount(group_ids, minlength=num_groups)
    n_correct = torch.bincount(group_ids[correct], minlength=num_groups)
    return _result(n_correct, counts, train_group_counts)


class GroupAccuracy:
    """Accumulates per-group correct counts over batches; :meth:`compute` gives the result.

    Example:
        >>> acc = GroupAccuracy(num_groups=2)
        >>> acc.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor([0, 1]))
        >>> acc.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))
        >>> r = acc.compute()
        >>> r.group_acc.tolist(), r.group_counts.tolist(), r.worst_group_acc
        ([1.0, 0.5], [1, 2], 0.5)
    """

    def __init__(self, num_groups: int, train_group_counts=None, device: Union[str, torch.device, None] = None):
        self.num_groups = _check_num_groups(num_groups)
        self.train_group_counts = train_group_counts
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._correct: Optional[torch.Tensor] = None  # [G] int64, on the batches' device
        self._counts: Optional[torch.Tensor] = None

    def update(self, logits_or_preds: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor) -> None:
        """Add one batch (same arguments as :func:`group_accuracy`)."""
        correct, group_ids = _correct(logits_or_preds, labels, group_ids, self.num_groups)
        if self.device is not None:
            correct, group_ids = correct.to(self.device), group_ids.to(self.device)
        counts = torch.bincount(group_ids, minlength=self.num_groups)
        n_correct = torch.bincount(group_ids[correct], minlength=self.num_groups)
        if self._counts is None:
            self._correct, self._counts = n_correct, counts
        else:
            self._correct = self._correct + n_correct.to(self._correct.device)
            self._counts = self._counts + counts.to(self._counts.device)

    def compute(self) -> GroupAccuracyResult:
        """The result over every batch since construction or :meth:`reset`."""
        if self._counts is None:
            zeros = torch.zeros(self.num_groups, dtype=torch.int64)
            return _result(zeros, zeros, self.train_group_counts)
        return _result(self._correct, self._counts, self.train_group_counts)


def memorization_gap(train_result: GroupAccuracyResult, test_result: GroupAccuracyResult) -> torch.Tensor:
    """``[G]`` float64: per-group train accuracy minus test accuracy (NaN where either is empty).

    Example:
        >>> train = group_accuracy(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([0, 1]), 2)
        >>> test = group_accuracy(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]), 2)
        >>> memorization_gap(train, test).tolist()
        [0.0, 1.0]
    """
    if train_result.num_groups != test_result.num_groups:
        raise ValueError(
            f"train_result has {train_result.num_groups} groups but test_result has {test_result.num_groups}"
        )
    return train_result.group_acc - test_result.group_acc


def _as_batches(data, batch_size: int):
    """Yield ``(images, labels, group_ids)`` batches from tensors or a dataset, in order."""
    if isinstance(data, (tuple, list)) and len(data) == 3 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels, group_ids = data
    elif all(hasattr(data, a) for a in ("images", "labels", "group_ids")) and getattr(data, "transform", None) is None:
        images, labels, group_ids = data.images, data.labels, data.group_ids
    elif isinstance(data, torch.utils.data.DataLoader):
        yield from data
        return
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        return
    else:
        raise TypeError(
            "data must be an (images, labels, group_ids) tuple of tensors, a DataLoader or a dataset of "
            f"(image, label, group_id) items; got {type(data).__name__}"
        )
    if not (images.shape[0] == labels.shape[0] == group_ids.shape[0]):
        raise ValueError(
            f"images, labels and group_ids must share dim 0, got {list(images.shape)}, {list(labels.shape)}, "
            f"{list(group_ids.shape)}"
        )
    for start in range(0, labels.shape[0], batch_size):
        end = start + batch_size
        yield images[start:end], labels[start:end], group_ids[start:end]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    num_groups: Optional[int] = None,
    batch_size: int = 512,
    device: Union[str, torch.device, None] = None,
    train_group_counts=None,
) -> GroupAccuracyResult:
    """Group accuracies of ``model`` on ``data``, in eval mode (the model's mode is restored).

    Args:
        model: a classifier returning logits ``[B, C]``.
        data: a dataset yielding ``(image, label, group_id)`` (e.g. :class:`spurfast.data.SynthWaterbirds`),
            a ``DataLoader`` of such batches, or an ``(images, labels, group_ids)`` tuple of tensors.
        num_groups: number of groups; defaults to ``data.num_groups``.
        batch_size: evaluation batch size.
        device: where to run; defaults to the model's device.
        train_group_counts: training counts per group, for ``weighted_acc``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y, g = torch.randn(10, 1, 2, 2), torch.randint(0, 2, (10,)), torch.arange(10) % 4
        >>> evaluate(model, (x, y, g), num_groups=4).group_counts.tolist()
        [3, 3, 2, 2]
    """
    if num_groups is None:
        num_groups = getattr(data, "num_groups", None)
        if num_groups is None:
            raise ValueError("num_groups is required when data has no .num_groups attribute")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    accumulator = GroupAccuracy(num_groups, train_group_counts=train_group_counts)
    was_training = model.training
    model.eval()
    try:
        for images, labels, group_ids in _as_batches(data, batch_size):
            logits = model(images.to(device, non_blocking=True))
            accumulator.update(logits, torch.as_tensor(labels).to(device), torch.as_tensor(group_ids).to(device))
    finally:
        model.train(was_training)
    result = accumulator.compute()
    result.group_names = getattr(data, "group_names", None)
    return result
