"""ERM baseline: a small training loop with per-group metrics, safetensors checkpoints and resume.

* :func:`erm` -- plain empirical risk minimization (mean cross-entropy) with SGD or Adam; after
  every epoch each evaluation set gets per-group accuracies (:func:`spurfast.metrics.evaluate`)
  and, with ``checkpoint_dir``, a checkpoint is written.
* :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`latest_checkpoint` -- one
  ``.safetensors`` file per epoch holding the model's state dict (``model.*``), the optimizer's
  tensor state (``optimizer.state.<param index>.<key>``), the torch RNG state (``rng.*``) and, in
  the safetensors metadata field, a JSON document with the epoch, the optimizer's param-group
  hyperparameters, the run's settings and its history. Files are written atomically (a temporary
  file in the same folder, then ``os.replace``), so a crash never leaves a half-written checkpoint.

Reproducibility: the data order of epoch ``e`` comes from its own generator seeded with
``(seed, e)``, and a checkpoint carries the global RNG state, so 1 epoch + resume + 1 epoch gives
bit-identical weights to 2 uninterrupted epochs on CPU (tested).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from spurfast.metrics import evaluate
from spurfast.train.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["erm", "make_optimizer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "epoch_seed"]

_RESERVED_KEYS = ("epoch", "loss", "train_running_acc", "lr", "seconds")


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data-order generator of ``epoch`` (0-based); distinct across (seed, epoch) pairs."""
    return int(seed) * 1_000_003 + int(epoch)


def make_optimizer(
    model: nn.Module, name: str = "sgd", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``) or ``"adam"`` over ``model.parameters()``.

    Example:
        >>> make_optimizer(nn.Linear(2, 2), "adam", lr=1e-3).__class__.__name__
        'Adam'
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _batches(dataset, order: torch.Tensor, batch_size: int):
    """Yield ``(images, labels)`` in ``order``; tensor datasets without a transform are sliced directly."""
    if all(hasattr(dataset, a) for a in ("images", "labels")) and getattr(dataset, "transform", None) is None:
        for start in range(0, order.numel(), batch_size):
            idx = order[start:start + batch_size]
            yield dataset.images[idx], dataset.labels[idx]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=0)
    for batch in loader:
        yield batch[0], torch.as_tensor(batch[1])


def erm(
    model: nn.Module,
    train_dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eval_datasets: Optional[Mapping[str, Any]] = None,
    num_groups: int = 4,
    device: Union[str, torch.device] = "cpu",
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    progress: bool = True,
    lr_schedule: str = "constant",
    eval_every: int = 1,
    eval_batch_size: int = 512,
) -> List[Dict[str, Any]]:
    """Train ``model`` in place by ERM (mean cross-entropy); return the per-epoch history.

    Args:
        model: classifier returning logits ``[B, C]``; moved to ``device``.
        train_dataset: yields ``(image, label, group_id)``; a dataset with ``.images``/``.labels``
            tensors and no ``transform`` is sliced directly (fast), anything else goes through a
            ``DataLoader``.
        epochs: total number of epochs (a resumed run continues up to this number).
        lr, momentum, weight_decay, optimizer: ``"sgd"`` or ``"adam"`` (see :func:`make_optimizer`).
        batch_size: training batch size (the last batch may be smaller).
        seed: seeds the global torch RNG at the start of a fresh run and the data order of
            every epoch (:func:`epoch_seed`). Model initialization is the caller's.
        eval_datasets: ``{name: dataset}`` evaluated after every epoch (e.g. ``{"train": ...,
            "test": ...}``), in eval mode.
        num_groups: number of groups in the evaluation sets.
        checkpoint_dir: if given, ``epoch_NNNN.safetensors`` is written there after every epoch.
        resume: continue from the latest checkpoint in ``checkpoint_dir`` (weights, optimizer,
            RNG state, history); starts fresh, with a warning, if there is none.
        progress: show tqdm progress bars.
        lr_schedule: ``"constant"`` or ``"cosine"`` (per step, from ``lr`` down to 0 at the end
            of ``epochs``); the rate is a function of the step, so resuming needs no scheduler state.
        eval_every: evaluate after every ``eval_every``-th epoch and after the last one.

    Returns:
        One dict per epoch: ``epoch`` (1-based), ``loss`` (mean training loss), ``train_running_acc``
        (accuracy on the training batches as they were seen), ``lr``, ``seconds``, and for every
        eval set ``name`` evaluated that epoch a :meth:`~spurfast.metrics.GroupAccuracyResult.to_dict` under ``name``.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> from spurfast.models import SmallCNN
        >>> train = SynthWaterbirds("train", n=64)
        >>> history = erm(SmallCNN(width=4), train, epochs=1, lr=0.01, batch_size=32,
        ...               eval_datasets={"train": train}, progress=False)
        >>> len(history), sorted(history[0]["train"])[:3]
        (1, ['avg_acc', 'group_acc', 'group_counts'])
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    eval_datasets = dict(eval_datasets or {})
    for name in eval_datasets:
        if name in _RESERVED_KEYS:
            raise ValueError(f"eval_datasets name {name!r} clashes with a history key; reserved: {_RESERVED_KEYS}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty")
    device = torch.device(device)
    model.to(device)
    opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    train_group_counts = None
    if hasattr(train_dataset, "group_ids"):
        train_group_counts = torch.bincount(torch.as_tensor(train_dataset.group_ids).cpu(), minlength=num_groups)

    settings = {
        "seed": seed, "batch_size": batch_size, "optimizer": optimizer.lower(), "lr_schedule": lr_schedule,
        "epochs": epochs if lr_schedule == "cosine" else None,  # the cosine rate depends on the horizon
    }
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    if latest is not None:
        meta = load_checkpoint(latest, model, opt, restore_rng=True)
        saved = meta["extra"].get("settings", {})
        mismatched = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if mismatched:
            raise ValueError(f"cannot resume from {latest!r}: settings differ (checkpoint, now): {mismatched}")
        start_epoch, history = meta["epoch"], list(meta["extra"].get("history", []))
    else:
        if resume:
            warnings.warn(f"resume=True but no checkpoint in {os.fspath(checkpoint_dir)!r}; starting from epoch 0")
        torch.manual_seed(seed)

    n = len(train_dataset)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        batch_losses: List[torch.Tensor] = []  # summed loss per batch, kept on device until the end
        batch_correct: List[torch.Tensor] = []
        bar = tqdm(
            _batches(train_dataset, order, batch_size),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for step, (images, labels) in enumerate(bar):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if lr_schedule == "cosine":
                progress_fraction = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress_fraction))
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batch_losses.append(loss.detach() * labels.shape[0])
            batch_correct.append((logits.detach().argmax(1) == labels).sum())
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        entry: Dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": torch.stack(batch_losses).sum().item() / n,
            "train_running_acc": torch.stack(batch_correct).sum().item() / n,
            "lr": opt.param_groups[0]["lr"],
        }
        do_eval = (epoch + 1) % eval_every == 0 or epoch + 1 == epochs
        for name, dataset in eval_datasets.items() if do_eval else ():
            result = evaluate(
                model, dataset, num_groups=num_groups, batch_size=eval_batch_size, device=device,
                train_group_counts=train_group_counts,
            )
            entry[name] = result.to_dict()
        entry["seconds"] = time.perf_counter() - started
        history.append(entry)
        if progress:
            summary = ", ".join(
                f"{name} avg {entry[name]['avg_acc']:.3f} worst {entry[name]['worst_group_acc']:.3f}"
                for name in eval_datasets if name in entry
            )
            tqdm.write(f"epoch {epoch + 1}: loss {entry['loss']:.4f}" + (f"; {summary}" if summary else ""))
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_path(checkpoint_dir, epoch + 1), model, opt, epoch=epoch + 1,
                extra={"settings": settings, "history": history},
            )
    return history
