"""Rare spurious patterns (Yang et al., 2022): the patterns, a poisoned dataset, the spurious score.

* :data:`PATTERNS` -- the paper's named patterns ``S1``/``S2``/``S3`` (corner squares) and
  ``R1``/``R2``/``R3`` (fixed random noise).
* :class:`Pattern`, :func:`make_pattern` -- a pattern as an object: a named one, or a user's
  tensor added to the image or pasted through a mask.
* :func:`add_pattern`, :func:`pattern_l2` -- apply a pattern; the l2 norm of the change it makes.
* :class:`PatternedDataset`, :func:`poison` -- a dataset with the pattern on ``n`` images of one class.
* :func:`spurious_score`, :func:`spurious_score_per_image` -- how often the pattern alone raises
  the target class's probability by more than a threshold on images of other classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from spurfast.attribution.scores import scoring_state
from spurfast.data._common import InMemoryGroupDataset

__all__ = [
    "PATTERNS", "Pattern", "make_pattern", "add_pattern", "pattern_l2", "PatternedDataset", "poison",
    "spurious_score", "spurious_score_per_image",
]

#: Pattern names: S1/S2/S3 set a 1x1/3x3/5x5 bottom-right corner square to the maximum value;
#: R1/R2/R3 add ``a * u`` (a = 0.25/0.5/1.0, one fixed ``u ~ U[0, 1]`` per seed) and clip.
PATTERNS = ("S1", "S2", "S3", "R1", "R2", "R3")
_SQUARE_SIZES = {"S1": 1, "S2": 3, "S3": 5}
_NOISE_SCALES = {"R1": 0.25, "R2": 0.5, "R3": 1.0}


def _check_images(images, arg: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4) or not images.is_floating_point():
        raise ValueError(
            f"{arg} must be a float tensor [N, C, H, W] or [C, H, W], got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape {list(getattr(images, 'shape', []))}"
        )


def _check_range(min_value, max_value) -> None:
    if not float(min_value) < float(max_value):
        raise ValueError(f"min_value must be below max_value, got min_value={min_value}, max_value={max_value}")


@dataclass(frozen=True, eq=False, repr=False)
class Pattern:
    """A spurious pattern and how it is applied; build one with :func:`make_pattern`.

    ``kind`` is ``"square"`` (S1/S2/S3: a ``size x size`` bottom-right square of every channel
    set to ``max_value``), ``"noise"`` (R1/R2/R3: ``clip(x + scale * u)``, ``u ~ U[0, 1]`` of
    the images' ``[C, H, W]`` drawn from ``seed``), ``"add"`` (a user tensor ``values``:
    ``clip(x + values)``) or ``"paste"`` (``where(mask, clip(values), x)``). User ``values`` and
    ``mask`` are ``[C, H, W]`` or ``[1, H, W]`` (one plane for every channel), kept on CPU and
    moved to the images' device and dtype when applied.

    Example:
        >>> p = make_pattern("S2")
        >>> p, p.apply(torch.zeros(3, 8, 8)).sum().item()  # 3 channels x 9 pixels
        (Pattern('S2'), 27.0)
    """

    name: str
    kind: str
    size: int = 0
    scale: float = 0.0
    seed: int = 0
    values: Optional[torch.Tensor] = None  # [C | 1, H, W], user patterns only
    mask: Optional[torch.Tensor] = None  # [C | 1, H, W] bool, "paste" only

    def __repr__(self) -> str:
        if self.kind == "square":
            return f"Pattern({self.name!r})"
        if self.kind == "noise":
            return f"Pattern({self.name!r}, seed={self.seed})"
        return f"Pattern({self.name!r}, kind={self.kind!r}, shape={list(self.values.shape)})"

    def apply(self, images: torch.Tensor, *, min_value: float = 0.0, max_value: float = 1.0) -> torch.Tensor:
        """A copy of ``images`` (``[N, C, H, W]`` or ``[C, H, W]``, float) with the pattern, same device and dtype."""
        _check_images(images)
        _check_range(min_value, max_value)
        channels, height, width = images.shape[-3:]
        out = images.clone()
        if self.kind == "square":
            k = self.size
            if k > min(height, width):
                raise ValueError(f"images: pattern {self.name} needs images of at least {k}x{k}, got {height}x{width}")
            out[..., -k:, -k:] = max_value
            return out
        if self.kind == "noise":
            # Drawn on CPU in float32 whatever the images' device, so a seed gives the same u everywhere.
            gen = torch.Generator().manual_seed(int(self.seed))
            u = torch.rand((channels, height, width), generator=gen, dtype=torch.float32)  # [C, H, W]
            out += self.scale * u.to(device=images.device, dtype=images.dtype)
            return out.clamp_(min_value, max_value)
        if tuple(self.values.shape[-2:]) != (height, width):
            raise ValueError(
                f"images: this pattern is {self.values.shape[-2]}x{self.values.shape[-1]}, got images of {height}x{width}"
            )
        for arg, t in (("values", self.values), ("mask", self.mask)):
            if t is not None and t.shape[0] not in (1, channels):
                raise ValueError(f"images: the pattern's {arg} has {t.shape[0]} channels, the images have {channels}")
        values = self.values.to(device=images.device, dtype=images.dtype)
        if self.kind == "add":
            out += values
            return out.clamp_(min_value, max_value)
        return torch.where(self.mask.to(images.device), values.clamp(min_value, max_value), out)

    def l2(self, images: torch.Tensor, *, min_value: float = 0.0, max_value: float = 1.0) -> float:
        """Mean over ``images`` of ``||apply(x) - x||_2``, the change actually made (after clipping)."""
        _check_images(images)
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        if batch.shape[0] == 0:
            raise ValueError("images must hold at least one image to measure the pattern on")
        return _mean_l2(self.apply(batch, min_value=min_value, max_value=max_value), batch)


def _mean_l2(patched: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean over images of ``||patched - clean||_2``, in float64."""
    change = (patched.double() - clean.double()).flatten(1)  # [N, C*H*W]
    return float(change.square().sum(1).sqrt().mean())


def _user_tensor(t, arg: str) -> torch.Tensor:
    """``[H, W]`` / ``[1, H, W]`` / ``[C, H, W]`` as a detached CPU ``[C | 1, H, W]`` copy."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or t.numel() == 0:
        raise ValueError(
            f"{arg} must be a tensor [C, H, W], [1, H, W] or [H, W], got "
            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else list(t.shape)}"
        )
    t = t.detach().cpu().clone()
    return t.unsqueeze(0) if t.dim() == 2 else t


def make_pattern(pattern: Union[str, Pattern, torch.Tensor], *, seed: int = 0, mask=None) -> Pattern:
    """A :class:`Pattern` from a name in :data:`PATTERNS`, an existing Pattern, or a user tensor.

    ``seed`` fixes ``u`` of R1/R2/R3 (ignored otherwise; an existing Pattern keeps its own). A
    user tensor of float values ``[C, H, W]`` (``[1, H, W]`` or ``[H, W]``: the same plane on
    every channel) is, without ``mask``, an additive perturbation ``clip(x + values)``; with a
    bool (or 0/1 float) ``mask`` of the same spatial shape, its values (clipped to the image
    range) replace the image where the mask is true: ``where(mask, values, x)``.

    Example:
        >>> make_pattern("R1", seed=3)
        Pattern('R1', seed=3)
        >>> plus = torch.zeros(8, 8); plus[-3:, -2] = 1.0; plus[-2, -3:] = 1.0
        >>> p = make_pattern(plus, mask=plus > 0)  # a white plus pasted in the bottom-right corner
        >>> p.kind, p.apply(torch.full((1, 8, 8), 0.5)).sum().item()  # 59 pixels of 0.5, 5 of 1.0
        ('paste', 34.5)
    """
    if isinstance(pattern, Pattern):
        if mask is not None:
            raise ValueError("mask goes with a tensor pattern, not with an existing Pattern")
        return pattern
    if isinstance(pattern, str):
        if mask is not None:
            raise ValueError(f"mask goes with a tensor pattern, not with the named pattern {pattern!r}")
        if pattern in _SQUARE_SIZES:
            return Pattern(pattern, "square", size=_SQUARE_SIZES[pattern])
        if pattern in _NOISE_SCALES:
            return Pattern(pattern, "noise", scale=_NOISE_SCALES[pattern], seed=int(seed))
        raise ValueError(f"pattern must be one of {PATTERNS}, a Pattern or a tensor, got {pattern!r}")
    if not isinstance(pattern, torch.Tensor):
        raise ValueError(f"pattern must be one of {PATTERNS}, a Pattern or a tensor, got {type(pattern).__name__}")
    values = _user_tensor(pattern, "pattern")  # [C | 1, H, W]
    if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
        raise ValueError(f"pattern must hold finite float values, got {values.dtype}")
    if mask is None:
        return Pattern("custom", "add", values=values)
    mask = _user_tensor(mask, "mask")
    if mask.is_floating_point():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool, or a float tensor of 0s and 1s")
        mask = mask != 0
    elif mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (or 0/1 float), got {mask.dtype}")
    if mask.shape[-2:] != values.shape[-2:]:
        raise ValueError(f"mask must have the pattern's spatial shape {list(values.shape[-2:])}, got {list(mask.shape)}")
    return Pattern("custom", "paste", values=values, mask=mask)


def add_pattern(
    images: torch.Tensor, pattern="S2", seed: int = 0, max_value: float = 1.0, min_value: float = 0.0
) -> torch.Tensor:
    """Return a copy of ``images`` (``[N, C, H, W]`` or ``[C, H, W]``, values in [min, max]) with the pattern.

    ``pattern``: a name in :data:`PATTERNS`, a :class:`Pattern` or a user tensor (see
    :func:`make_pattern`). ``S1``/``S2``/``S3``: the bottom-right 1x1/3x3/5x5 square of every
    channel set to ``max_value``. ``R1``/``R2``/``R3``: ``clip(x + a * u, min_value, max_value)``
    with ``a`` = 0.25/0.5/1.0 and ``u ~ U[0, 1]`` of shape ``[C, H, W]`` drawn once from ``seed``
    (the same ``u`` for every image).

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> add_pattern(x, "S2").sum().item()  # 2 images x 3 channels x 9 pixels
        54.0
        >>> torch.equal(add_pattern(x, "R1", seed=3), add_pattern(x, "R1", seed=3))
        True
    """
    _check_images(images)
    return make_pattern(pattern, seed=seed).apply(images, min_value=min_value, max_value=max_value)


def pattern_l2(pattern, images: torch.Tensor, *, seed: int = 0, min_value: float = 0.0, max_value: float = 1.0) -> float:
    """Mean over ``images`` of ``||add_pattern(x) - x||_2``: the pattern's size as actually applied.

    Example:
        >>> import math
        >>> pattern_l2("S3", torch.zeros(4, 3, 32, 32)) == math.sqrt(5 * 5 * 3)
        True
    """
    return make_pattern(pattern, seed=seed).l2(images, min_value=min_value, max_value=max_value)


class PatternedDataset(InMemoryGroupDataset):
    """``base`` with ``pattern`` added to ``n`` randomly chosen images of ``target_class``.

    Labels and group ids are unchanged. ``base`` needs ``.images`` (float ``[N, C, H, W]``) and
    ``.labels`` tensors and, optionally, ``.group_ids`` (without them each class is a group).
    ``seed`` chooses the images and fixes R1/R2/R3's noise. The poisoned indices are
    ``poisoned_indices`` (``[n]`` int64, sorted), ``is_poisoned`` is a ``[N]`` bool mask,
    ``pattern`` the :class:`Pattern` applied and ``pattern_l2`` the mean l2 norm of the change
    over the poisoned images (0.0 for ``n = 0``).

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> base = SynthWaterbirds("train", n=100)
        >>> ds = PatternedDataset(base, target_class=1, n=5, pattern="S3", seed=0)
        >>> len(ds), int(ds.is_poisoned.sum()), bool((ds.labels[ds.poisoned_indices] == 1).all())
        (100, 5, True)
        >>> bool((ds.images[ds.poisoned_indices][..., -5:, -5:] == 1).all()), ds.pattern_l2 > 0
        (True, True)
    """

    def __init__(
        self, base, target_class: int, n: int, pattern="S2", seed: int = 0, *,
        min_value: float = 0.0, max_value: float = 1.0,
    ):
        for attr in ("images", "labels"):
            if not isinstance(getattr(base, attr, None), torch.Tensor):
                raise ValueError(f"base must have a .{attr} tensor (e.g. SynthWaterbirds); got {type(base).__name__}")
        if base.images.dim() != 4 or not base.images.is_floating_point() or base.images.shape[0] != base.labels.shape[0]:
            raise ValueError(
                f"base: expected float images [N, C, H, W] and labels [N], got {base.images.dtype} "
                f"{list(base.images.shape)} and {list(base.labels.shape)}"
            )
        if isinstance(target_class, bool) or not isinstance(target_class, int):
            raise ValueError(f"target_class must be an int, got {target_class!r}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"n must be an int, got {n!r}")
        pattern = make_pattern(pattern, seed=seed)
        _check_range(min_value, max_value)
        candidates = torch.nonzero(base.labels.cpu() == target_class).flatten()
        if not 0 <= n <= candidates.numel():
            raise ValueError(f"n must lie in [0, {candidates.numel()}] (images of class {target_class}), got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:n]].sort().values
        self.images = base.images.clone()  # [N, C, H, W]
        self.pattern_l2 = 0.0
        if n:
            clean = base.images[chosen.to(base.images.device)]
            # Applied once here so that the check on the image size comes before anything is stored.
            patched = pattern.apply(clean, min_value=min_value, max_value=max_value)
            self.images[chosen.to(base.images.device)] = patched
            self.pattern_l2 = _mean_l2(patched, clean)
        self.labels = base.labels
        group_ids = getattr(base, "group_ids", None)
        has_groups = isinstance(group_ids, torch.Tensor)
        self.group_ids = group_ids if has_groups else base.labels.long()  # [N]; without groups, one per class
        self.poisoned_indices = chosen  # [n] int64
        self.is_poisoned = torch.zeros(len(self.labels), dtype=torch.bool)  # [N]
        self.is_poisoned[chosen] = True
        self.target_class, self.pattern, self.seed, self.n = target_class, pattern, seed, n
        self.min_value, self.max_value = float(min_value), float(max_value)
        inferred = int(self.group_ids.max()) + 1 if self.group_ids.numel() else 0
        self.num_groups = getattr(base, "num_groups", inferred) if has_groups else inferred
        self.group_names = getattr(base, "group_names", None) if has_groups else None
        self.transform = getattr(base, "transform", None)


def poison(dataset, target_class: int, n: int, pattern, seed: int = 0, **kwargs) -> PatternedDataset:
    """Poison ``n`` images of ``target_class`` with ``pattern``: a :class:`PatternedDataset`.

    Touches exactly ``n`` images, all of ``target_class`` (recorded in ``poisoned_indices``);
    every other image is bit-identical and no label changes. ``kwargs``: ``min_value``/``max_value``.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> base = SynthWaterbirds("train", n=60)
        >>> ds = poison(base, target_class=0, n=3, pattern="R2", seed=1)
        >>> ds.poisoned_indices.tolist() == sorted(ds.poisoned_indices.tolist()), ds.pattern.name
        (True, 'R2')
    """
    return PatternedDataset(dataset, target_class, n, pattern, seed, **kwargs)


@torch.no_grad()
def spurious_score_per_image(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_class: int,
    pattern,
    seed: int = 0,
    threshold: float = 0.1,
    batch_size: int = 512,
    device=None,
    *,
    min_value: float = 0.0,
    max_value: float = 1.0,
) -> torch.Tensor:
    """``[M]`` bool, one per image not of ``target_class`` (in order): ``p_c(x + pattern) - p_c(x) > threshold``.

    See :func:`spurious_score` for the arguments.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(20, 3, 8, 8), torch.tensor([0, 1] * 10)
        >>> spurious_score_per_image(model, x, y, target_class=1, pattern="S3").shape
        torch.Size([10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor [N, C, H, W], got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape {list(getattr(images, 'shape', []))}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {list(getattr(labels, 'shape', []))}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
        raise ValueError(f"target_class must be a non-negative int, got {target_class!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pattern = make_pattern(pattern, seed=seed)
    _check_range(min_value, max_value)
    others = images[(labels != target_class).to(images.device)]  # [M, C, H, W]
    if others.shape[0] == 0:
        raise ValueError(f"images: no test image outside target_class {target_class}")
    pattern.apply(others[:1], min_value=min_value, max_value=max_value)  # size/channel errors before any mode change
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    hits = []
    with scoring_state(model):
        for start in range(0, others.shape[0], batch_size):
            clean = others[start:start + batch_size].to(device)
            patched = pattern.apply(clean, min_value=min_value, max_value=max_value)
            logits_clean = model(clean)  # [B, K]
            if start == 0 and (logits_clean.dim() != 2 or not target_class < logits_clean.shape[1]):
                raise ValueError(
                    f"target_class {target_class} is out of range for a model whose output has shape "
                    f"{list(logits_clean.shape)} (expected [B, K] with K > target_class)"
                )
            # float64 softmax: the comparison with the threshold should not depend on the model's dtype.
            p_clean = torch.softmax(logits_clean.double(), dim=1)[:, target_class]  # [B]
            p_patched = torch.softmax(model(patched).double(), dim=1)[:, target_class]  # [B]
            hits.append((p_patched - p_clean > threshold).cpu())
    return torch.cat(hits)


def spurious_score(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_class: int,
    pattern,
    seed: int = 0,
    threshold: float = 0.1,
    batch_size: int = 512,
    device=None,
    *,
    min_value: float = 0.0,
    max_value: float = 1.0,
) -> float:
    """Fraction of test images not of ``target_class`` whose ``p_target`` rises by more than ``threshold``
    when the pattern is added: ``mean[p_c(x + pattern) - p_c(x) > threshold]`` (Yang et al., 2022).

    ``images`` ``[N, C, H, W]`` float and ``labels`` ``[N]`` may live on CPU: batches of
    ``batch_size`` go to ``device`` (default: the device of the model's parameters). Runs
    ``model`` in eval mode without gradients; every module's mode is restored, also after an
    exception. ``pattern`` and ``seed`` must be the ones the model was trained with (``seed``
    fixes ``u`` of R1/R2/R3); ``threshold`` lies in [0, 1). ``target_class`` is checked
    against the model's output width on the first batch.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 2, (20,))
        >>> 0.0 <= spurious_score(model, x, y, target_class=1, pattern="S3") <= 1.0
        True
    """
    hits = spurious_score_per_image(
        model, images, labels, target_class, pattern, seed, threshold, batch_size, device,
        min_value=min_value, max_value=max_value,
    )
    return int(hits.sum()) / hits.numel()
