"""Hugging Face transformers: :class:`NeuronStatsCallback` records :class:`spurfast.NeuronStats`
on every training micro-batch of a ``transformers.Trainer`` and saves them at the end of each epoch.

How it runs in the Trainer's loop (``Trainer._run_epoch`` / ``training_step``, transformers 5.x):
the Trainer calls ``model(**inputs)`` inside ``training_step``, then backward, then the callback
events ``on_substep_end`` (a micro-batch that only accumulates) or ``on_pre_optimizer_step`` /
``on_step_end`` (the one before the optimizer step). A TrainerCallback has no event between the
batch and the forward, so the callback puts a forward pre-hook on the model: it takes the
group ids out of the keyword arguments (the model never sees that column) and opens the record
block when the model runs in training mode with grad enabled; the first of those events after
the backward closes it.

* The group column must reach the model: ``TrainingArguments(remove_unused_columns=False)``
  (the default ``True`` drops every column that is not a parameter of ``model.forward``);
  ``on_train_begin`` raises if the column would be dropped.
* Gradient accumulation: the Trainer divides the model's loss by the micro-batches of the
  optimizer step (``gradient_accumulation_steps``; fewer in an epoch's last step) unless it
  passes ``num_items_in_batch`` to the model, which it does when the model's forward takes
  ``**kwargs`` and the batch has labels; the loss is then used as the model returns it. The
  callback reproduces that rule for ``record(loss_scale=)`` and checks it against the gradient
  that reaches the model's returned loss in backward (a mismatch, e.g. from a ``compute_loss``
  override, raises instead of recording wrong statistics). How the *model* uses
  ``num_items_in_batch`` is told by ``model_loss``: ``"mean"`` (it ignores it and returns the
  batch mean, as ``BertForSequenceClassification`` does) or ``"num_items"`` (it returns its
  items' summed loss divided by it, as transformers' language-model heads do).
* Mixed precision: the GradScaler of ``fp16=True`` (on the Trainer's prepared optimizer) is
  passed on; a batch whose scaled gradients overflowed is dropped with a warning.
* Exceptions: the Trainer has no exception event. An exception in the model's forward (or in
  this callback's pre-hook) is caught by an ``always_call`` forward hook, which leaves the open
  block without folding and removes the hooks. After an exception anywhere else in a training
  step (loss, backward, optimizer, another callback) the block and hooks stay until
  :meth:`NeuronStatsCallback.close` or the next ``trainer.train()`` (``on_train_begin`` drops
  them); the interrupted batch is never folded.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from typing import Callable, List, Optional, Union

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # a clear pointer instead of a bare ModuleNotFoundError
    raise ImportError(f"spurfast.integrations.huggingface needs transformers, which does not import ({exc}); "
                      "install it with pip install 'spurfast[huggingface]' (or pip install transformers)") from exc

from spurfast.capture import NeuronStats
from spurfast.integrations import _check_filename, _check_num_groups, _loss_scale, _OpenRecord

__all__ = ["NeuronStatsCallback"]

MODEL_LOSSES = ("mean", "num_items")


class NeuronStatsCallback(TrainerCallback):
    """Record :class:`spurfast.NeuronStats` on the Trainer's training micro-batches; save every epoch.

    Args:
        num_groups: number of groups G; the batch's group ids lie in ``[0, G)``.
        group_key: the key of the ``[B]`` integer group ids in the batch dict (a dataset column
            the collator stacks, e.g. ``"group"``); removed from the model's inputs.
        output_dir: folder for the files; default ``TrainingArguments.output_dir``.
        filename: file name, formatted with ``epoch`` (0 for the first epoch).
        sample_key: optional key of ``[B]`` sample ids (kept as ``stats.last_sample_ids``);
            removed from the model's inputs too.
        model_loss: how the model's returned loss relates to the per-sample losses ``l_n`` when
            the Trainer passes it ``num_items_in_batch``: ``"mean"``, it is ``mean_n l_n`` (the
            model ignores ``num_items_in_batch``); ``"num_items"``, it is
            ``sum_n l_n / num_items_in_batch``, ``l_n`` the summed loss of sample n's items
            (tokens). Default ``None``: ``"mean"``, with a warning (once) the first time
            ``num_items_in_batch`` is passed, since the callback cannot see which it is.
        loss_scale: ``None`` (default): the Trainer's factor times ``model_loss``'s, checked in
            backward. A number, or a callable ``inputs -> number`` of the model's keyword
            arguments: the backward loss is that times ``mean_n l_n``, taken as given (for a
            custom ``compute_loss``); a GradScaler's scale is applied on top in both cases.
        reset_every_epoch: ``False`` (default): each file holds the running totals since the
            statistics were created (the first ``train()`` with this model); ``True``: each
            file holds that epoch's batches only.
        **neuron_stats_kwargs: passed to :class:`spurfast.NeuronStats` (``layers``,
            ``track_group_grad``, ...). ``loss_reduction`` must stay ``"mean"``.

    ``stats`` is the NeuronStats (created at the first ``on_train_begin``, on the Trainer's
    model, kept across ``train()`` calls with the same model); ``saved_paths`` lists the files
    written. ``NeuronStats.load(path, model)`` assigned to ``callback.stats`` before the first
    ``train()`` resumes from a file (the statistics are not part of the Trainer's checkpoints). Under torch.distributed every rank records its own micro-batches and the save at
    each epoch's end sums them over ranks (every rank calls it; rank 0 writes).
    ``nn.DataParallel`` (several GPUs in one process) is not supported.

    Example::

        >>> import os, tempfile, torch, transformers
        >>> from spurfast.integrations.huggingface import NeuronStatsCallback
        >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                  intermediate_size=32, vocab_size=50, max_position_embeddings=16)
        >>> model = transformers.BertForSequenceClassification(config)
        >>> data = [{"input_ids": torch.randint(1, 50, (8,)), "labels": i % 2, "group": i % 3} for i in range(8)]
        >>> callback = NeuronStatsCallback(num_groups=3, group_key="group", model_loss="mean")
        >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1,
        ...     per_device_train_batch_size=4, remove_unused_columns=False, use_cpu=True, report_to=[],
        ...     save_strategy="no", disable_tqdm=True)
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        >>> trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # it prints the metrics
        >>> _ = trainer.train()
        >>> callback.stats.group_count.tolist(), [os.path.basename(p) for p in callback.saved_paths]
        ([3, 3, 2], ['neuron_stats_epoch0.safetensors'])
    """

    def __init__(
        self,
        num_groups: int,
        group_key: str = "group",
        output_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        filename: str = "neuron_stats_epoch{epoch}.safetensors",
        sample_key: Optional[str] = None,
        model_loss: Optional[str] = None,
        loss_scale: Optional[Union[float, Callable[[dict], float]]] = None,
        reset_every_epoch: bool = False,
        **neuron_stats_kwargs,
    ):
        self.num_groups = _check_num_groups(num_groups)
        for name, key in (("group_key", group_key), ("sample_key", sample_key)):
            if not isinstance(key, str) and not (name == "sample_key" and key is None):
                raise TypeError(f"{name} must be the str key of a column of the batch dict, got {key!r}")
        self.group_key = group_key
        self.sample_key = sample_key
        if model_loss is not None and model_loss not in MODEL_LOSSES:
            raise ValueError(f"model_loss must be one of {MODEL_LOSSES} or None, got {model_loss!r}")
        self.model_loss = model_loss
        if loss_scale is not None and not callable(loss_scale) and (
                isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
                or not 0 < loss_scale < float("inf")):
            raise ValueError(f"loss_scale must be None, a positive number or a callable inputs -> number, got {loss_scale!r}")
        self.loss_scale = loss_scale
        if neuron_stats_kwargs.get("loss_reduction", "mean") != "mean":
            raise ValueError("NeuronStatsCallback records the Trainer's loss, a mean over the batch: "
                             f"loss_reduction must be 'mean', got {neuron_stats_kwargs['loss_reduction']!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.filename = _check_filename(filename)
        self.reset_every_epoch = bool(reset_every_epoch)
        self.neuron_stats_kwargs = neuron_stats_kwargs
        self.stats: Optional[NeuronStats] = None
        self.saved_paths: List[str] = []
        self._model_ref = None
        self._hooks: list = []
        self._open: Optional[_OpenRecord] = None
        self._expected_grad: Optional[float] = None  # d(backward loss) / d(model's loss) the block assumes
        self._seen_grad: Optional[float] = None
        self._num_items_passed = False
        self._warned_num_items = False
        self._epoch = 0

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self.close()  # what an earlier train() that raised outside the model's forward left behind
        if model is None:
            raise RuntimeError("NeuronStatsCallback: the Trainer passed no model to on_train_begin")
        if args.n_gpu > 1:
            raise NotImplementedError(
                f"NeuronStatsCallback: the Trainer wraps the model in nn.DataParallel (n_gpu={args.n_gpu}); "
                "run one process per GPU instead (torchrun / accelerate launch)"
            )
        if args.remove_unused_columns:
            params = inspect.signature(model.forward).parameters
            dropped = [k for k in (self.group_key, self.sample_key) if k is not None and k not in params]
            if dropped:
                raise ValueError(
                    f"NeuronStatsCallback: TrainingArguments(remove_unused_columns=True) drops the column(s) {dropped} "
                    f"before the batch reaches the model (they are not parameters of {type(model).__name__}.forward); "
                    "pass TrainingArguments(remove_unused_columns=False)"
                )
        if self.stats is not None and self._model_ref is None:
            self._model_ref = weakref.ref(model)  # assigned before the first train(): resume from a file
        elif self.stats is None or self._model_ref() is not model:
            self.stats = NeuronStats(model, self.num_groups, **self.neuron_stats_kwargs)
            self._model_ref = weakref.ref(model)
        self._args, self._state = args, state
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
        accumulation = args.gradient_accumulation_steps
        try:
            self._steps_in_epoch = len(train_dataloader)
        except TypeError:  # an iterable dataset: the Trainer's own count (Trainer.set_initial_training_values)
            self._steps_in_epoch = state.max_steps * accumulation
        self._updates_per_epoch = max(math.ceil(self._steps_in_epoch / accumulation), 1)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True),
        ]

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = math.floor((state.epoch or 0) + 1e-6)  # mid-epoch when resumed from a checkpoint

    def on_substep_end(self, args, state, control, **kwargs):
        self._fold()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._fold()

    def on_step_end(self, args, state, control, **kwargs):
        self._fold()  # for transformers without on_pre_optimizer_step; a no-op otherwise

    def on_epoch_end(self, args, state, control, **kwargs):
        self._abort()
        folder = self.output_dir or args.output_dir
        path = os.path.join(folder, self.filename.format(epoch=self._epoch))
        self.saved_paths.append(self.stats.save(path))  # a collective under torch.distributed: every rank calls it
        if self.reset_every_epoch:
            self.stats.reset()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Leave an open record block without folding it and remove the hooks from the model.

        Called by ``on_train_end``; call it yourself after a ``trainer.train()`` that raised
        outside the model's forward (the Trainer has no exception event). ``stats`` stays."""
        self._abort()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _remove_hooks_in_forward_hook(self, module) -> None:
        """Remove the hooks from inside the forward hook that runs while an exception leaves the
        model's forward. ``Module._call_impl`` is then iterating ``module._forward_hooks``
        itself: deleting an entry there is safe only for its last one (CPython's OrderedDict
        iterator checks for changes before each item that follows), so a forward hook
        registered after this one leaves this one in place, inert, until :meth:`close`."""
        kept = []
        for handle in self._hooks:
            if handle.hooks_dict_ref() is module._forward_hooks and next(reversed(module._forward_hooks), None) != handle.id:
                kept.append(handle)
            else:
                handle.remove()
        self._hooks = kept

    # ------------------------------------------------------------------ model hooks
    def _pre_forward(self, module, args, kwargs):
        group_ids = kwargs.pop(self.group_key, None)
        sample_ids = kwargs.pop(self.sample_key, None) if self.sample_key is not None else None
        if not (module.training and torch.is_grad_enabled()):
            return args, kwargs
        if group_ids is None:
            raise KeyError(
                f"NeuronStatsCallback: group_key={self.group_key!r} is not among the model's inputs {sorted(kwargs)}; "
                "the batch dict must hold it (a dataset column) and TrainingArguments(remove_unused_columns=False) keep it"
            )
        if self.sample_key is not None and sample_ids is None:
            raise KeyError(f"NeuronStatsCallback: sample_key={self.sample_key!r} is not among the model's inputs "
                           f"{sorted(kwargs)}")
        if self._open is not None:
            raise RuntimeError(
                "NeuronStatsCallback: the model ran a second training forward before the Trainer's step events closed "
                "the record block of the first; it records one forward and backward per micro-batch (after a "
                "trainer.train() that raised, call callback.close())"
            )
        if not isinstance(group_ids, torch.Tensor):
            group_ids = torch.as_tensor(group_ids)
        if sample_ids is not None and not isinstance(sample_ids, torch.Tensor):
            sample_ids = torch.as_tensor(sample_ids)
        factor, self._expected_grad = self._factors(kwargs, group_ids.shape[0] if group_ids.dim() else 0)
        self._seen_grad = None
        self._open = _OpenRecord(self.stats, group_ids, _loss_scale(self._scaler, factor), sample_ids)
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        if output is None and sys.exc_info()[0] is not None:  # the forward (or a pre-hook) raised
            self._abort()
            self._remove_hooks_in_forward_hook(module)
            return
        if self._open is not None and self._expected_grad is not None and self._seen_grad is None:
            loss = output.get("loss") if isinstance(output, Mapping) else None
            if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.numel() == 1:
                loss.register_hook(self._on_loss_grad)

    def _on_loss_grad(self, grad: torch.Tensor) -> None:
        self._seen_grad = float(grad)

    # ------------------------------------------------------------------ internals
    def _factors(self, inputs: dict, batch_size: int):
        """(record's loss_scale without the GradScaler, the expected gradient at the model's
        loss or None when not checked) for the micro-batch whose keyword arguments are ``inputs``."""
        scale = float(self._scaler.get_scale()) if self._scaler is not None and self._scaler.is_enabled() else 1.0
        if self.loss_scale is not None:
            factor = self.loss_scale(inputs) if callable(self.loss_scale) else self.loss_scale
            return float(factor), None
        args = self._args
        num_items = inputs.get("num_items_in_batch")
        self._num_items_passed = num_items is not None
        if num_items is not None:
            # training_step: a loss normalised by num_items_in_batch is not divided by the
            # accumulation steps; compute_loss multiplies it by the processes averaging tokens.
            trainer_factor = float(args.world_size) if args.average_tokens_across_devices and args.world_size > 1 else 1.0
            if self.model_loss is None and not self._warned_num_items:
                self._warned_num_items = True
                warnings.warn(
                    "NeuronStatsCallback: the Trainer passes num_items_in_batch to the model; its loss is taken as the "
                    "batch mean of the per-sample losses (model_loss='mean', right for models that ignore "
                    "num_items_in_batch such as BertForSequenceClassification); pass model_loss='num_items' for a model "
                    "that divides its summed loss by it (transformers' language-model heads), or model_loss='mean' "
                    "to silence this", RuntimeWarning, stacklevel=2,
                )
            model_factor = batch_size / float(num_items) if self.model_loss == "num_items" else 1.0
        else:
            if self.model_loss == "num_items":
                raise RuntimeError("NeuronStatsCallback: model_loss='num_items', but the Trainer passes no "
                                   "num_items_in_batch to the model (its forward takes no **kwargs, or the batch has no labels)")
            # divided by the micro-batches of this optimizer step; an epoch's last step may have fewer
            accumulation = args.gradient_accumulation_steps
            last_step = self._state.global_step % self._updates_per_epoch == self._updates_per_epoch - 1
            micro_batches = (self._steps_in_epoch % accumulation or accumulation) if last_step else accumulation
            trainer_factor, model_factor = 1.0 / micro_batches, 1.0
        return trainer_factor * model_factor, trainer_factor * scale

    def _fold(self) -> None:
        block, self._open = self._open, None
        if block is None:
            return
        expected, seen = self._expected_grad, self._seen_grad
        if expected is not None and seen is not None and not math.isclose(seen, expected, rel_tol=1e-4):
            block.abort()
            self.close()
            raise RuntimeError(
                f"NeuronStatsCallback: the Trainer multiplied the model's loss by {seen:g} before backward, the callback "
                f"expected {expected:g} (gradient_accumulation_steps={self._args.gradient_accumulation_steps}, "
                f"num_items_in_batch passed to the model: {'yes' if self._num_items_passed else 'no'}, "
                f"GradScaler: {'none' if self._scaler is None else f'scale {self._scaler.get_scale():g}'}); "
                "a compute_loss or training_step override changes it: pass loss_scale= to the callback. "
                "This batch was not recorded"
            )
        try:
            block.fold()
        except BaseException:
            self.close()
            raise

    def _abort(self) -> None:
        block, self._open = self._open, None
        if block is not None:
            block.abort()
