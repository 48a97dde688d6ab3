"""The dense/masked training framework of You et al. (2025, Part II), as pieces and as a loop.

One network, two branches sharing its weights: the *dense* branch is the model as it is, the
*masked* branch runs it with a :class:`~spurfast.masks.Mask`'s selected weights zeroed
(:func:`spurfast.masks.masked`). The objective (:func:`spurfast.losses.dense_masked_loss`) pulls
the two branches' representations of each image together with NT-Xent and keeps the dense
branch on the labels with a small cross-entropy; the mask is refreshed every epoch.

Pieces that plug into any loop:

* :func:`find_classifier` / :func:`features_and_logits` -- the penultimate features (the input
  of the final classifier layer, caught by a forward hook) and the logits, from one forward.
* :func:`refresh_mask` -- the per-epoch mask: the ``fraction`` smallest-magnitude weights,
  global over every Linear/Conv weight (:meth:`Mask.smallest_magnitude`), optionally joined by
  the ``channel_fraction`` channels of largest gradient norm (:meth:`Mask.top_gradient_channels`).
* :func:`gradient_stats` -- the :class:`~spurfast.NeuronStats` pass that gradient-norm channel
  pruning reads (cross-entropy, eval mode, every training sample once).
* :func:`dense_masked_step` -- one optimizer step: dense forward, masked forward, loss, backward, step.

And the loop, :func:`silent_majority`: fine-tune a (typically ERM-trained) model with the
paper's defaults -- Adam, lr 2e-4, ``ReduceLROnPlateau``, 21 epochs, batch 100, 1 % smallest
weights masked, gradient-norm channel pruning off (as in the paper's code) -- with progress
bars, per-epoch per-group metrics of the dense branch, and atomic safetensors checkpoints
with bit-identical resume, following :func:`spurfast.train.erm`.

The paper's text and its public code differ in what the NT-Xent compares: penultimate
features (text; ``on="features"``, the default) or the two branches' softmax outputs (code;
``on="softmax"``). Both are offered, and ``on="logits"`` too.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from spurfast.capture import NeuronStats
from spurfast.losses import CONTRAST_ON, dense_masked_loss
from spurfast.masks import Mask, masked
from spurfast.metrics import evaluate
from spurfast.train.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from spurfast.train.erm import _batches, epoch_seed, make_optimizer

__all__ = [
    "find_classifier", "features_and_logits", "refresh_mask", "gradient_stats", "dense_masked_step",
    "DenseMaskedStep", "silent_majority", "mask_path", "PLATEAU_METRICS",
]

_RESERVED_KEYS = ("epoch", "loss", "contrastive", "cross_entropy", "train_running_acc", "lr", "mask_fraction",
                  "mask_count", "seconds")
#: Eval-set metrics ``ReduceLROnPlateau`` can follow (``"<eval set>:<metric>"``, maximised);
#: ``"loss"`` (the epoch's mean training objective, minimised) needs no evaluation set.
PLATEAU_METRICS = ("worst_group_acc", "avg_acc", "mean_acc")


# --------------------------------------------------------------------------------------------
# Features and logits from one forward
# --------------------------------------------------------------------------------------------


def find_classifier(model: nn.Module, classifier: Optional[Union[str, nn.Module]] = None) -> Tuple[str, nn.Module]:
    """``(name, module)`` of the final classifier layer, whose input is taken as the penultimate features.

    ``classifier`` names it (a submodule name, or the module itself); by default it is the last
    ``nn.Linear`` in ``model.named_modules()`` order (``classifier`` of :class:`~spurfast.models.SmallCNN`
    and :class:`~spurfast.models.MLP`, ``_fc`` of :func:`~spurfast.models.efficientnet_lite0`).

    Example:
        >>> from spurfast.models import SmallCNN
        >>> find_classifier(SmallCNN(width=4))[0]
        'classifier'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if classifier is None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("model has no nn.Linear to take as the classifier; pass classifier=<module name>")
        return linears[-1]
    if isinstance(classifier, str):
        try:
            return classifier, model.get_submodule(classifier)
        except AttributeError as exc:
            raise ValueError(f"classifier: model has no submodule {classifier!r}") from exc
    if isinstance(classifier, nn.Module):
        for name, module in model.named_modules():
            if module is classifier:
                return name, module
        raise ValueError("classifier: the module given is not a submodule of model")
    raise TypeError(f"classifier must be a submodule name or an nn.Module, got {type(classifier).__name__}")


def features_and_logits(
    model: nn.Module, images: torch.Tensor, classifier: Optional[Union[str, nn.Module]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features [B, D], logits [B, C])`` of one ordinary ``model(images)`` call.

    ``features`` is the input of the classifier layer (:func:`find_classifier`), caught by a
    forward pre-hook that is removed before returning; ``logits`` is the model's output. Gradients
    flow through both. The classifier must run exactly once in the forward.

    Example:
        >>> from spurfast.models import SmallCNN
        >>> model = SmallCNN(width=4).eval()
        >>> x = torch.rand(3, 3, 32, 32)
        >>> features, logits = features_and_logits(model, x)
        >>> features.shape, torch.equal(features, model.forward_features(x)), logits.shape
        (torch.Size([3, 16]), True, torch.Size([3, 2]))
    """
    _, module = find_classifier(model, classifier)
    with _classifier_inputs(module) as caught:
        logits = model(images)
    if len(caught) != 1:
        raise RuntimeError(f"the classifier ran {len(caught)} times in one forward; expected exactly once")
    features = caught[0]
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not isinstance(logits, torch.Tensor):
        raise RuntimeError(
            "the classifier's input must be a [B, D] tensor and the model's output a [B, C] tensor; got "
            f"{getattr(features, 'shape', type(features).__name__)} and "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    return features, logits


@contextlib.contextmanager
def _classifier_inputs(module: nn.Module) -> Iterator[List[torch.Tensor]]:
    caught: List[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: caught.append(args[0] if args else None))
    try:
        yield caught
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# The per-epoch mask
# --------------------------------------------------------------------------------------------


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def refresh_mask(
    model: nn.Module,
    fraction: float = 0.01,
    stats: Optional[NeuronStats] = None,
    channel_fraction: float = 0.0,
    group: Optional[int] = None,
) -> Mask:
    """The mask of one epoch: the ``fraction`` smallest-magnitude weights, global over the
    Linear/Conv weights (:meth:`Mask.smallest_magnitude`, the paper's 1 %), joined (``|``) by
    the ``channel_fraction`` channels of largest gradient norm in ``stats``
    (:meth:`Mask.top_gradient_channels`, optionally of one ``group``; off by default, as in the
    paper's code). Reads the model, changes nothing.

    Args:
        model: the model being trained.
        fraction: in ``[0, 1)``; 0 selects no weight by magnitude.
        stats: a :class:`~spurfast.NeuronStats` with a recorded backward (e.g. :func:`gradient_stats`);
            needed when ``channel_fraction > 0``.
        channel_fraction: in ``[0, 1)``.
        group: with ``channel_fraction``, rank channels by this group's gradient statistics.

    Returns:
        A :class:`~spurfast.masks.Mask` (element entries) of the weights the masked branch zeroes.

    Example:
        >>> from spurfast.models import SmallCNN
        >>> model = SmallCNN(width=4)
        >>> mask = refresh_mask(model, fraction=0.01)
        >>> 0 < mask.count() <= 0.011 * sum(m.weight.numel() for m in model.modules()
        ...                                 if isinstance(m, (nn.Conv2d, nn.Linear)))
        True
    """
    fraction = _check_fraction("fraction", fraction)
    channel_fraction = _check_fraction("channel_fraction", channel_fraction)
    if channel_fraction > 0 and stats is None:
        raise ValueError("channel_fraction > 0 needs stats (a NeuronStats with a recorded backward)")
    if stats is not None and not isinstance(stats, NeuronStats):
        raise TypeError(f"stats must be a spurfast.NeuronStats, got {type(stats).__name__}")
    mask = Mask.smallest_magnitude(model, fraction).to_elements()
    if channel_fraction > 0:
        mask = mask | Mask.top_gradient_channels(stats, channel_fraction, group=group).to_elements()
    mask.validate(model)
    return mask


def gradient_stats(
    model: nn.Module,
    dataset,
    *,
    num_groups: int = 4,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
) -> NeuronStats:
    """One :class:`~spurfast.NeuronStats` pass of the cross-entropy over ``dataset`` (every
    sample once, in order, eval mode), for gradient-norm channel pruning (:func:`refresh_mask`).

    The model is left as found: its train/eval flags and every parameter's ``.grad`` are
    restored (also on an exception). Only the gradient statistics are kept (no activation or
    ablation statistics).

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> from spurfast.models import SmallCNN
        >>> model = SmallCNN(width=4)
        >>> stats = gradient_stats(model, SynthWaterbirds("train", n=32), batch_size=16)
        >>> stats.group_count.sum().item(), all(p.grad is None for p in model.parameters())
        (32, True)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    stats = NeuronStats(model, num_groups=num_groups, track_activations=False, track_ablation=False)
    saved_grads = {p: p.grad for p in model.parameters()}
    was_training = {m: m.training for m in model.modules()}
    order = torch.arange(len(dataset))
    group_ids_all = torch.as_tensor(dataset.group_ids) if hasattr(dataset, "group_ids") else None
    model.eval()
    try:
        start = 0
        for images, labels in _batches(dataset, order, batch_size):
            n = labels.shape[0]
            if group_ids_all is not None:
                group_ids = group_ids_all[start:start + n]
            else:
                group_ids = torch.as_tensor([dataset[i][2] for i in range(start, start + n)])
            start += n
            for p in model.parameters():
                p.grad = None
            with stats.record(group_ids.to(device)):
                logits = model(images.to(device))
                torch.nn.functional.cross_entropy(logits, labels.to(device)).backward()
    finally:
        for p, g in saved_grads.items():
            p.grad = g
        for m, flag in was_training.items():
            m.training = flag
    return stats


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


class DenseMaskedStep(NamedTuple):
    """What :func:`dense_masked_step` computed (detached): the objective's parts and the dense logits ``[B, C]``."""

    total: torch.Tensor
    contrastive: torch.Tensor
    cross_entropy: torch.Tensor
    dense_logits: torch.Tensor


def dense_masked_step(
    model: nn.Module,
    mask: Mask,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    on: str = "features",
    ce_weight: float = 0.2,
    temperature: float = 0.5,
    classifier: Optional[Union[str, nn.Module]] = None,
) -> DenseMaskedStep:
    """One optimizer step of the framework on a batch.

    The dense branch runs ``model(images)``; the masked branch runs it again inside
    ``masked(model, mask)`` (the mask's selected weights zeroed, the same Parameters, BatchNorm
    normalising with the batch's statistics without updating its running statistics, so they
    move once per step, from the dense branch). Then
    :func:`~spurfast.losses.dense_masked_loss` (``on``, ``ce_weight``, ``temperature``),
    ``optimizer.zero_grad(set_to_none=True)``, ``backward()``, ``optimizer.step()``.

    Example:
        >>> from spurfast.models import SmallCNN
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = SmallCNN(width=4)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        >>> x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
        >>> out = dense_masked_step(model, refresh_mask(model, 0.01), x, y, optimizer)
        >>> out.dense_logits.shape, bool(out.total > 0)
        (torch.Size([8, 2]), True)
    """
    if on not in CONTRAST_ON:
        raise ValueError(f"on must be one of {CONTRAST_ON}, got {on!r}")
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a spurfast.masks.Mask, got {type(mask).__name__}")
    _, module = find_classifier(model, classifier)
    dense_features, dense_logits = features_and_logits(model, images, module)
    with masked(model, mask):
        masked_features, masked_logits = features_and_logits(model, images, module)
    parts = dense_masked_loss(
        dense_logits, masked_logits, labels, dense_features=dense_features, masked_features=masked_features,
        on=on, ce_weight=ce_weight, temperature=temperature,
    )
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    optimizer.step()
    return DenseMaskedStep(parts.total.detach(), parts.contrastive.detach(), parts.cross_entropy.detach(),
                           dense_logits.detach())


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def mask_path(checkpoint_dir: Union[str, os.PathLike], epoch: int) -> str:
    """``<checkpoint_dir>/epoch_<epoch:04d>.mask.safetensors``: the mask used during ``epoch`` (1-based)."""
    return checkpoint_path(checkpoint_dir, epoch)[: -len(".safetensors")] + ".mask.safetensors"


def _parse_plateau_metric(plateau_metric: str, eval_names, eval_every: int) -> Tuple[Optional[str], str]:
    """``(eval set name or None, metric)`` of ``plateau_metric``; validated."""
    if plateau_metric == "loss":
        return None, "loss"
    name, sep, metric = plateau_metric.rpartition(":") if isinstance(plateau_metric, str) else ("", "", "")
    if not sep or metric not in PLATEAU_METRICS or name not in eval_names:
        raise ValueError(
            f"plateau_metric must be 'loss' or '<eval set>:<metric>' with an eval_datasets name "
            f"({sorted(eval_names)}) and a metric in {PLATEAU_METRICS}, got {plateau_metric!r}"
        )
    if eval_every != 1:
        raise ValueError(f"plateau_metric {plateau_metric!r} needs eval_every=1, got {eval_every}")
    return name, metric


def silent_majority(
    model: nn.Module,
    train_dataset,
    *,
    epochs: int = 21,
    lr: float = 2e-4,
    batch_size: int = 100,
    seed: int = 0,
    on: str = "features",
    ce_weight: float = 0.2,
    temperature: float = 0.5,
    prune_fraction: float = 0.01,
    channel_fraction: float = 0.0,
    channel_group: Optional[int] = None,
    weight_decay: float = 0.0,
    plateau_metric: str = "loss",
    plateau_factor: float = 0.1,
    plateau_patience: int = 10,
    eval_datasets: Optional[Mapping[str, Any]] = None,
    num_groups: int = 4,
    device: Union[str, torch.device] = "cpu",
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    progress: bool = True,
    eval_every: int = 1,
    eval_batch_size: int = 512,
    classifier: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Fine-tune ``model`` in place with the dense/masked framework; return the per-epoch history.

    Every epoch: refresh the mask from the current weights (:func:`refresh_mask`: the
    ``prune_fraction`` smallest-magnitude weights, plus, with ``channel_fraction > 0``, the
    channels of largest gradient norm from a :func:`gradient_stats` pass), then one
    :func:`dense_masked_step` per batch, in the data order of :func:`~spurfast.train.epoch_seed`
    (as :func:`~spurfast.train.erm`). Adam (``lr``, ``weight_decay``); after every epoch
    ``ReduceLROnPlateau`` steps on ``plateau_metric``. The dense branch (the model itself) is
    what gets evaluated.

    Args:
        model: a classifier returning logits ``[B, C]`` (typically trained by ERM first); moved
            to ``device`` and trained in place. Its penultimate features are the input of its
            classifier layer (:func:`find_classifier`; name it with ``classifier``).
        train_dataset: yields ``(image, label, group_id)``, as for :func:`~spurfast.train.erm`.
        epochs: total epochs (the paper's 21; a resumed run continues up to this number).
        lr, batch_size, weight_decay: Adam's rate (the paper's 2e-4), the batch (100), decay.
        seed: seeds the global torch RNG at the start of a fresh run and every epoch's data order.
        on, ce_weight, temperature: the objective (:func:`~spurfast.losses.dense_masked_loss`):
            ``"features"`` (the paper's text, default), ``"softmax"`` (its code) or ``"logits"``;
            0.2; 0.5.
        prune_fraction: fraction of the Linear/Conv weights masked by magnitude (0.01).
        channel_fraction, channel_group: gradient-norm channel pruning (off by default).
        plateau_metric: what ``ReduceLROnPlateau`` follows: ``"loss"`` (default: the epoch's mean
            training objective, minimised; it uses no group labels), or ``"<eval set>:<metric>"``
            with ``metric`` in :data:`PLATEAU_METRICS` (maximised, e.g. ``"val:worst_group_acc"``,
            which uses the validation set's groups). The paper names the scheduler, not its
            settings: ``plateau_factor`` and ``plateau_patience`` default to torch's 0.1 and 10.
        eval_datasets: ``{name: dataset}`` evaluated (dense branch, eval mode) after every
            ``eval_every``-th epoch and the last one.
        num_groups, device, progress, eval_batch_size: as for :func:`~spurfast.train.erm`.
        checkpoint_dir: if given, after every epoch ``epoch_NNNN.safetensors`` (model, Adam state,
            RNG state, scheduler state, settings and history; :func:`~spurfast.train.save_checkpoint`)
            and ``epoch_NNNN.mask.safetensors`` (that epoch's mask, :func:`mask_path`,
            :meth:`Mask.load`) are written atomically, the mask first.
        resume: continue from the latest checkpoint in ``checkpoint_dir``; the mask needs no
            restoring since every epoch recomputes it from the weights. 1 epoch + resume + 1 epoch
            gives weights bit-identical to 2 uninterrupted epochs on CPU (tested).

    Returns:
        One dict per epoch, as :func:`~spurfast.train.erm`'s (``epoch``, ``loss`` -- here the mean
        total objective --, ``train_running_acc`` of the dense branch, ``lr``, ``seconds``, one
        :meth:`~spurfast.metrics.GroupAccuracyResult.to_dict` per evaluated set) plus
        ``contrastive`` and ``cross_entropy`` (their epoch means) and ``mask_count`` /
        ``mask_fraction`` (weights masked that epoch, and their fraction of the covered weights).

    The model on return: trained in place, the same Parameter objects, in the train/eval mode it
    had when called (also after an exception), no hook left.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> from spurfast.models import SmallCNN
        >>> train = SynthWaterbirds("train", n=64)
        >>> history = silent_majority(SmallCNN(width=4), train, epochs=1, batch_size=32,
        ...                           eval_datasets={"train": train}, progress=False)
        >>> len(history), sorted(history[0]["train"])[:3], history[0]["mask_fraction"] > 0
        (1, ['avg_acc', 'group_acc', 'group_counts'], True)
    """
    # ---- validation, before anything changes
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if on not in CONTRAST_ON:
        raise ValueError(f"on must be one of {CONTRAST_ON}, got {on!r}")
    prune_fraction = _check_fraction("prune_fraction", prune_fraction)
    channel_fraction = _check_fraction("channel_fraction", channel_fraction)
    if channel_group is not None and (isinstance(channel_group, bool) or not isinstance(channel_group, int)
                                      or not 0 <= channel_group < num_groups):
        raise ValueError(f"channel_group must be None or a group index in [0, {num_groups}), got {channel_group!r}")
    if not isinstance(plateau_factor, (int, float)) or not 0 < plateau_factor < 1:
        raise ValueError(f"plateau_factor must be in (0, 1), got {plateau_factor!r}")
    if isinstance(plateau_patience, bool) or not isinstance(plateau_patience, int) or plateau_patience < 0:
        raise ValueError(f"plateau_patience must be a non-negative int, got {plateau_patience!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    eval_datasets = dict(eval_datasets or {})
    for name in eval_datasets:
        if name in _RESERVED_KEYS:
            raise ValueError(f"eval_datasets name {name!r} clashes with a history key; reserved: {_RESERVED_KEYS}")
    plateau_set, plateau_key = _parse_plateau_metric(plateau_metric, eval_datasets, eval_every)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty")
    classifier_name, _ = find_classifier(model, classifier)
    # the loss's own checks (ce_weight, temperature), on a dummy batch, before any state change
    dense_masked_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), on="logits",
                      ce_weight=ce_weight, temperature=temperature)

    device = torch.device(device)
    modes = {m: m.training for m in model.modules()}
    model.to(device)
    opt = make_optimizer(model, "adam", lr=lr, weight_decay=weight_decay)
    mode = "min" if plateau_key == "loss" else "max"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=plateau_factor,
                                                           patience=plateau_patience)
    train_group_counts = None
    if hasattr(train_dataset, "group_ids"):
        train_group_counts = torch.bincount(torch.as_tensor(train_dataset.group_ids).cpu(), minlength=num_groups)
    settings = {
        "seed": seed, "batch_size": batch_size, "optimizer": "adam", "on": on, "ce_weight": float(ce_weight),
        "temperature": float(temperature), "prune_fraction": prune_fraction, "channel_fraction": channel_fraction,
        "channel_group": channel_group, "plateau_metric": plateau_metric, "classifier": classifier_name,
    }
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    try:
        if latest is not None:
            meta = load_checkpoint(latest, model, opt, restore_rng=True)
            saved = meta["extra"].get("settings", {})
            mismatched = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if mismatched:
                raise ValueError(f"cannot resume from {latest!r}: settings differ (checkpoint, now): {mismatched}")
            scheduler.load_state_dict(meta["extra"]["scheduler"])
            start_epoch, history = meta["epoch"], list(meta["extra"].get("history", []))
        else:
            if resume:
                warnings.warn(f"resume=True but no checkpoint in {os.fspath(checkpoint_dir)!r}; starting from epoch 0")
            torch.manual_seed(seed)

        n = len(train_dataset)
        steps_per_epoch = (n + batch_size - 1) // batch_size
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            stats = None
            if channel_fraction > 0:
                stats = gradient_stats(model, train_dataset, num_groups=num_groups, batch_size=eval_batch_size,
                                       device=device)
            mask = refresh_mask(model, prune_fraction, stats=stats, channel_fraction=channel_fraction,
                                group=channel_group)
            del stats
            model.train()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
            sums: Dict[str, List[torch.Tensor]] = {"loss": [], "contrastive": [], "cross_entropy": [], "correct": []}
            bar = tqdm(_batches(train_dataset, order, batch_size), total=steps_per_epoch,
                       desc=f"silent majority {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for step, (images, labels) in enumerate(bar):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                out = dense_masked_step(model, mask, images, labels, opt, on=on, ce_weight=ce_weight,
                                        temperature=temperature, classifier=classifier_name)
                b = labels.shape[0]
                sums["loss"].append(out.total * b)
                sums["contrastive"].append(out.contrastive * b)
                sums["cross_entropy"].append(out.cross_entropy * b)
                sums["correct"].append((out.dense_logits.argmax(1) == labels).sum())
                if progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{out.total.item():.4f}")
            bar.close()
            entry: Dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": torch.stack(sums["loss"]).sum().item() / n,
                "contrastive": torch.stack(sums["contrastive"]).sum().item() / n,
                "cross_entropy": torch.stack(sums["cross_entropy"]).sum().item() / n,
                "train_running_acc": torch.stack(sums["correct"]).sum().item() / n,
                "lr": opt.param_groups[0]["lr"],
                "mask_count": mask.count(),
                "mask_fraction": mask.fraction(),
            }
            do_eval = (epoch + 1) % eval_every == 0 or epoch + 1 == epochs
            for name, dataset in eval_datasets.items() if do_eval else ():
                result = evaluate(model, dataset, num_groups=num_groups, batch_size=eval_batch_size, device=device,
                                  train_group_counts=train_group_counts)
                entry[name] = result.to_dict()
            scheduler.step(entry["loss"] if plateau_set is None else entry[plateau_set][plateau_key])
            entry["seconds"] = time.perf_counter() - started
            history.append(entry)
            if progress:
                summary = ", ".join(
                    f"{name} avg {entry[name]['avg_acc']:.3f} worst {entry[name]['worst_group_acc']:.3f}"
                    for name in eval_datasets if name in entry
                )
                tqdm.write(f"epoch {epoch + 1}: loss {entry['loss']:.4f} (contrastive {entry['contrastive']:.4f}, "
                           f"ce {entry['cross_entropy']:.4f})" + (f"; {summary}" if summary else ""))
            if checkpoint_dir is not None:
                mask.save(mask_path(checkpoint_dir, epoch + 1))  # atomic, as the checkpoint
                save_checkpoint(
                    checkpoint_path(checkpoint_dir, epoch + 1), model, opt, epoch=epoch + 1,
                    extra={"settings": settings, "history": history, "scheduler": scheduler.state_dict()},
                )
    finally:
        for m, flag in modes.items():
            m.training = flag
    return history
