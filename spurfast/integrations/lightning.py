"""PyTorch Lightning: :class:`NeuronStatsCallback` records :class:`spurfast.NeuronStats` on
every training batch and saves them at the end of each epoch.

How it runs in Lightning's loop (``lightning.pytorch`` 2.x, automatic optimization): the
record block opens in ``on_train_batch_start`` and closes in ``on_train_batch_end``; the
``training_step`` and its backward run between the two (``_TrainingEpochLoop.advance`` calls
the batch-start hooks, then the optimization closure, training step and backward, then the
batch-end hooks). With manual optimization ``manual_backward`` runs in the same window.

* Gradient accumulation: Lightning divides each training step's loss by
  ``trainer.accumulate_grad_batches`` before backward (``ClosureResult.from_training_step_output``),
  the last, shorter accumulation of an epoch included; the callback passes that factor as
  ``record(loss_scale=)``, so the statistics are those of the undivided per-sample losses.
* Mixed precision: a GradScaler on the precision plugin (``trainer.precision_plugin.scaler``,
  ``precision="16-mixed"``) is passed on too; a batch whose scaled gradients overflowed (the
  scaler skips that step) is dropped from the statistics with a warning.
* Exceptions: ``on_exception`` leaves an open block without folding the batch, so the model
  is as it was and the statistics hold only the batches that finished.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Callable, List, Optional, Union

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # a clear pointer instead of a bare ModuleNotFoundError
    raise ImportError(f"spurfast.integrations.lightning needs lightning, which does not import ({exc}); "
                      "install it with pip install 'spurfast[lightning]' (or pip install lightning)") from exc

from spurfast.capture import NeuronStats
from spurfast.integrations import _check_filename, _check_num_groups, _loss_scale, _OpenRecord

BatchKey = Union[str, int, Callable[[object], torch.Tensor]]

__all__ = ["NeuronStatsCallback"]


class NeuronStatsCallback(pl.Callback):
    """Record :class:`spurfast.NeuronStats` on the training batches; save them every epoch.

    Args:
        num_groups: number of groups G; the batch's group ids lie in ``[0, G)``.
        group_key: where each batch holds its ``[B]`` integer group ids: a key of a dict batch,
            an index into a tuple/list batch, or a callable ``batch -> [B] tensor``.
        dirpath: folder for the files; default ``trainer.log_dir`` (``default_root_dir``
            without a logger).
        filename: file name, formatted with ``epoch`` (Lightning's ``current_epoch``, 0 for the
            first epoch).
        sample_key: optional, as ``group_key``, for ``[B]`` sample ids kept as
            ``stats.last_sample_ids``.
        reset_every_epoch: ``False`` (default): each file holds the running totals since the
            statistics were created (the first ``fit`` on this module); ``True``: each file
            holds that epoch's batches only (the statistics are reset after each save).
        **neuron_stats_kwargs: passed to :class:`spurfast.NeuronStats` (``loss_reduction``,
            ``layers``, ``track_group_grad``, ...); ``loss_reduction`` must describe the loss
            ``training_step`` returns (``"mean"`` over the batch by default).

    ``stats`` is the NeuronStats (created at the first ``fit``, on the LightningModule, and
    kept across later ``fit`` calls on the same module); ``saved_paths`` lists the files
    written. Reload a file with ``NeuronStats.load(path)`` (analysis) or
    ``NeuronStats.load(path, module)`` (to record on): assigned to ``callback.stats`` before
    the first ``fit``, it resumes from the file (the statistics are not part of Lightning's
    checkpoints). Under DDP every rank records its own
    batches and the save sums them over ranks (rank 0 writes). The sharded strategies (FSDP,
    ModelParallel, DeepSpeed) are refused: the callback has not been tested with them
    (NeuronStats itself is, under FSDP1 and ``fully_shard`` in a plain loop).

    Example::

        >>> import torch, torch.nn as nn, torch.nn.functional as F
        >>> import lightning.pytorch as pl, tempfile
        >>> from spurfast.integrations.lightning import NeuronStatsCallback
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         return F.cross_entropy(self.net(batch["x"]), batch["y"])
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = [{"x": torch.randn(4), "y": i % 2, "group": i % 3} for i in range(8)]
        >>> callback = NeuronStatsCallback(num_groups=3, group_key="group", dirpath=tempfile.mkdtemp())
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
        >>> callback.stats.group_count.tolist(), [os.path.basename(p) for p in callback.saved_paths]
        ([3, 3, 2], ['neuron_stats_epoch0.safetensors'])
    """

    def __init__(
        self,
        num_groups: int,
        group_key: BatchKey = "group",
        dirpath: Optional[Union[str, "os.PathLike[str]"]] = None,
        filename: str = "neuron_stats_epoch{epoch}.safetensors",
        sample_key: Optional[BatchKey] = None,
        reset_every_epoch: bool = False,
        **neuron_stats_kwargs,
    ):
        super().__init__()
        self.num_groups = _check_num_groups(num_groups)
        self.group_key = _check_key(group_key, "group_key")
        self.sample_key = None if sample_key is None else _check_key(sample_key, "sample_key")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.filename = _check_filename(filename)
        self.reset_every_epoch = bool(reset_every_epoch)
        self.neuron_stats_kwargs = neuron_stats_kwargs
        self.stats: Optional[NeuronStats] = None
        self.saved_paths: List[str] = []
        self._module_ref = None
        self._open: Optional[_OpenRecord] = None

    # ------------------------------------------------------------------ fit
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise NotImplementedError(
                f"NeuronStatsCallback: strategy {strategy} shards the model and this callback has not been tested "
                "with it; use a single device or DDP, or record NeuronStats in your own loop, where FSDP1 and "
                "fully_shard are tested (tests/test_fsdp.py)"
            )
        if self.stats is not None and self._module_ref is None:
            self._module_ref = weakref.ref(pl_module)  # assigned before the first fit: resume from a file
        elif self.stats is None or self._module_ref() is not pl_module:
            self.stats = NeuronStats(pl_module, self.num_groups, **self.neuron_stats_kwargs)
            self._module_ref = weakref.ref(pl_module)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx: int) -> None:
        # A block still open here had no on_train_batch_end: the LightningModule's
        # on_train_batch_start returned -1 (Lightning then skips the step and the batch-end hooks).
        self._abort()
        group_ids = _from_batch(batch, self.group_key, "group_key")
        sample_ids = None if self.sample_key is None else _from_batch(batch, self.sample_key, "sample_key")
        # Lightning divides the loss by accumulate_grad_batches in automatic optimization only.
        factor = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._open = _OpenRecord(self.stats, group_ids, _loss_scale(scaler, factor), sample_ids)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        block, self._open = self._open, None
        if block is not None:
            block.fold()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._abort()
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir  # log_dir: on every rank
        path = os.path.join(folder, self.filename.format(epoch=trainer.current_epoch))
        self.saved_paths.append(self.stats.save(path))  # a collective under DDP: every rank calls it
        if self.reset_every_epoch:
            self.stats.reset()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._abort()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._abort()

    def _abort(self) -> None:
        block, self._open = self._open, None
        if block is not None:
            block.abort()


def _check_key(key, name: str):
    if isinstance(key, bool) or not (isinstance(key, (str, int)) or callable(key)):
        raise TypeError(f"{name} must be a dict key (str), a tuple index (int) or a callable batch -> [B] tensor, "
                        f"got {key!r}")
    return key


def _describe(batch) -> str:
    if isinstance(batch, Mapping):
        return f"{type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of {len(batch)} items"
    if isinstance(batch, torch.Tensor):
        return f"tensor of shape {list(batch.shape)}"
    return type(batch).__name__


def _from_batch(batch, key: BatchKey, name: str) -> torch.Tensor:
    """The ``[B]`` integer tensor that ``key`` (``group_key``/``sample_key``) names in ``batch``."""
    if isinstance(key, str):
        if not isinstance(batch, Mapping):
            raise TypeError(f"NeuronStatsCallback: {name}={key!r} is a dict key, but the batch is a {_describe(batch)}; "
                            f"pass an int index for tuple/list batches or a callable batch -> [B] tensor")
        if key not in batch:
            raise KeyError(f"NeuronStatsCallback: {name}={key!r} is not in the batch, a {_describe(batch)}")
        value = batch[key]
    elif isinstance(key, int):
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"NeuronStatsCallback: {name}={key} is a tuple index, but the batch is a {_describe(batch)}")
        if not -len(batch) <= key < len(batch):
            raise IndexError(f"NeuronStatsCallback: {name}={key} is out of range for the batch, a {_describe(batch)}")
        value = batch[key]
    else:
        value = key(batch)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype.is_floating_point \
            or value.dtype.is_complex or value.dtype == torch.bool:
        found = f"{value.dtype} tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise ValueError(f"NeuronStatsCallback: {name}={key!r} must give a [B] integer tensor, one id per sample "
                         f"of the batch; it gave a {found}")
    return value
