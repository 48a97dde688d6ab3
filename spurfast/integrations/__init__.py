"""Trainer callbacks that record :class:`spurfast.NeuronStats` while a trainer trains.

* :mod:`spurfast.integrations.lightning`: ``NeuronStatsCallback``, a PyTorch Lightning
  ``Callback`` (``pip install spurfast[lightning]``).
* :mod:`spurfast.integrations.huggingface`: ``NeuronStatsCallback``, a Hugging Face
  ``transformers.TrainerCallback`` (``pip install spurfast[huggingface]``).

Both take each batch's group ids from the batch by a key the user names, record every
training batch (forward and backward) and save the running statistics as a safetensors file
at the end of each epoch, reloadable with :meth:`spurfast.NeuronStats.load`. Importing this
package imports neither trainer: import the submodule of the one you use.
"""
from __future__ import annotations

from typing import Optional

import torch


class _RecordAborted(Exception):
    """Thrown into an open record() block to leave it without folding the batch."""


class _OpenRecord:
    """A ``stats.record(...)`` block entered in one trainer hook and left in a later one
    (the forward and backward run between them, in the trainer's own code)."""

    def __init__(self, stats, group_ids: torch.Tensor, loss_scale, sample_ids: Optional[torch.Tensor]):
        block = stats.record(group_ids, loss_scale=loss_scale, sample_ids=sample_ids)
        block.__enter__()  # on an error here nothing is open
        self._block = block

    def fold(self) -> None:
        """Leave the block normally: the batch joins the running statistics (record()'s own
        errors, such as a non-finite statistic, propagate with the block already closed)."""
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)

    def abort(self) -> None:
        """Leave the block as on an exception: nothing is folded, the layers are restored."""
        block, self._block = self._block, None
        if block is not None:
            error = _RecordAborted()
            block.__exit__(_RecordAborted, error, None)


def _loss_scale(scaler, factor: float):
    """``record(loss_scale=)`` for a loss multiplied by ``factor`` and then by ``scaler``
    (a ``torch.amp.GradScaler`` or None)."""
    if scaler is None or not scaler.is_enabled():
        return factor
    return scaler if factor == 1.0 else (scaler, factor)


def _check_filename(filename: str) -> str:
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str with an optional {{epoch}} field, got {type(filename).__name__}")
    try:
        filename.format(epoch=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"filename {filename!r} must be a format string whose only field is {{epoch}} ({exc})") from None
    return filename


def _check_num_groups(num_groups) -> int:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    return num_groups
