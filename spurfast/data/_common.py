"""Shared pieces of the datasets: split names, group counts, the missing-file error, in-memory access."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

SPLITS = ("train", "val", "test")
#: Waterbirds' training counts per group (y0/land, y0/water, y1/land, y1/water).
WATERBIRDS_TRAIN_COUNTS = (3498, 184, 56, 1057)
SYNTH_GROUP_NAMES = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")


class DatasetFileError(FileNotFoundError, ValueError):
    """A file or folder a dataset needs is missing (both a ``FileNotFoundError`` and a ``ValueError``)."""


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def split_counts(total: int, fractions: Sequence[float]) -> List[int]:
    """Integer counts summing to ``total``, proportional to ``fractions`` (largest remainders)."""
    weights = torch.tensor(fractions, dtype=torch.float64)
    exact = weights / weights.sum() * total
    counts = exact.floor().long()
    remainder = total - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:remainder]] += 1
    return counts.tolist()


def resolve_group_counts(split: str, n: Optional[int], group_counts: Optional[Sequence[int]]) -> List[int]:
    """Per-group image counts of a generated split: ``group_counts`` as given, else ``n`` (default
    4795 for train, 1200 otherwise) in Waterbirds' training proportions (train) or balanced."""
    if group_counts is None:
        if n is None:
            n = sum(WATERBIRDS_TRAIN_COUNTS) if split == "train" else 1200
        if n < 4:
            raise ValueError(f"n must be >= 4, got {n}")
        fractions = WATERBIRDS_TRAIN_COUNTS if split == "train" else (1, 1, 1, 1)
        group_counts = split_counts(n, fractions)
    group_counts = [int(c) for c in group_counts]
    if len(group_counts) != 4 or min(group_counts) < 0 or sum(group_counts) == 0:
        raise ValueError(f"group_counts must be 4 non-negative counts with a positive sum, got {group_counts}")
    return group_counts


class InMemoryGroupDataset(torch.utils.data.Dataset):
    """Access for datasets held as tensors ``images``, ``labels``, ``group_ids`` (and ``transform``, ``num_groups``)."""

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], self.group_ids[index]

    def group_counts(self) -> torch.Tensor:
        """``[G]`` int64: number of images per group."""
        return torch.bincount(self.group_ids, minlength=self.num_groups)
