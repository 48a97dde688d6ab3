"""Shared pieces of the datasets: split names and the missing-file error."""
from __future__ import annotations

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
