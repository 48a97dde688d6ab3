"""Datasets with groups: an embedded spurious-correlation benchmark, a rare-pattern variant,
and loaders for Waterbirds, CelebA and a user's own grouped images.

Every dataset yields ``(image, label, group_id)`` with ``group_id = label * num_attrs + attr``
(for two attributes: groups 0..3 = (y0, a0), (y0, a1), (y1, a0), (y1, a1)).

* :class:`SynthWaterbirds` -- procedurally generated 3x32x32 images, no download: the label
  is a foreground shape (ellipse/plus vs. triangle/square), the spurious attribute a textured
  background ("land" vs. "water") that agrees with the label on ~95% of training images, in
  Waterbirds' training proportions 3498 / 184 / 56 / 1057. Val/test are group-balanced.
* :func:`add_pattern`, :class:`PatternedDataset`, :func:`spurious_score` -- the rare spurious
  pattern setup of Yang et al. (2022): a fixed pattern added to ``n`` images of one class.
* :class:`Waterbirds`, :class:`CelebA`, :class:`GroupedCSVDataset`,
  :class:`GroupedImageFolder` -- image files on disk, read through PIL with ImageNet-style
  transforms (:func:`imagenet_eval_transform`, :func:`imagenet_train_transform`).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "SynthWaterbirds",
    "WATERBIRDS_TRAIN_COUNTS",
    "PATTERNS",
    "add_pattern",
    "PatternedDataset",
    "spurious_score",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "ImageNetEvalTransform",
    "ImageNetTrainTransform",
    "Waterbirds",
    "CelebA",
    "GroupedCSVDataset",
    "GroupedImageFolder",
    "GroupedFileDataset",
    "DatasetFileError",
]

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


# --------------------------------------------------------------------------------------------
# Embedded benchmark
# --------------------------------------------------------------------------------------------


def _split_counts(total: int, fractions: Sequence[float]) -> List[int]:
    """Integer counts summing to ``total``, proportional to ``fractions`` (largest remainders)."""
    weights = torch.tensor(fractions, dtype=torch.float64)
    exact = weights / weights.sum() * total
    counts = exact.floor().long()
    remainder = total - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:remainder]] += 1
    return counts.tolist()


def _backgrounds(attr: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Textured backgrounds ``[N, 3, S, S]`` in [0, 1]: attr 0 = "land", attr 1 = "water".

    Land: olive/brown base with blotchy low-frequency texture and horizontal strata.
    Water: blue base with diagonal waves. Colour and texture phase are jittered per image, so
    the attribute is easy to see but no two backgrounds are identical.
    """
    n = attr.numel()
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
    land_base = torch.tensor([0.50, 0.42, 0.20])
    water_base = torch.tensor([0.15, 0.35, 0.70])
    base = torch.where(attr[:, None].bool(), water_base, land_base)  # [N, 3]
    base = base + 0.06 * torch.randn(n, 3, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    freq = 3.0 + 2.0 * torch.rand(n, 1, 1, generator=gen)
    waves = torch.sin(2 * math.pi * freq * (xx + yy) + phase)  # diagonal waves
    strata = torch.sin(2 * math.pi * freq * yy + phase)  # horizontal bands
    # Blotches: upsampled coarse noise.
    coarse = torch.rand(n, 1, 4, 4, generator=gen)
    blotch = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0] - 0.5
    is_water = attr[:, None, None].bool()
    texture = torch.where(is_water, 0.12 * waves, 0.06 * strata + 0.25 * blotch)  # [N, S, S]
    return base[:, :, None, None] + texture[:, None]


def _shape_masks(shape_id: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Foreground masks ``[N, S, S]`` (float in [0, 1]) of random position and size.

    shape 0 = ellipse, 1 = plus, 2 = triangle, 3 = square.
    """
    n = shape_id.numel()
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    radius = size * (0.14 + 0.10 * torch.rand(n, generator=gen))  # half-extent in pixels
    margin = radius + 1
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=gen)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=gen)
    aspect = 0.75 + 0.5 * torch.rand(n, generator=gen)
    dx = (xx - cx[:, None, None]) / radius[:, None, None]  # [N, S, S], unit = radius
    dy = (yy - cy[:, None, None]) / radius[:, None, None]
    dxa, dya = dx * aspect[:, None, None], dy / aspect[:, None, None]
    ellipse = dxa**2 + dya**2 <= 1.0
    arm = 0.35
    plus = ((dxa.abs() <= arm) & (dya.abs() <= 1.0)) | ((dya.abs() <= arm) & (dxa.abs() <= 1.0))
    # Upright isosceles triangle: apex at top, base at the bottom.
    triangle = (dya <= 1.0) & (dxa.abs() <= (dya + 1.0) / 2.0)
    square = (dxa.abs() <= 0.8) & (dya.abs() <= 0.8)
    masks = torch.stack([ellipse, plus, triangle, square], dim=1).float()  # [N, 4, S, S]
    return masks[torch.arange(n), shape_id]


class SynthWaterbirds(torch.utils.data.Dataset):
    """Embedded Waterbirds-like benchmark: procedurally generated RGB images, no files.

    The label is carried by a foreground shape (label 0: ellipse or plus, label 1: triangle or
    square) of random position, size, aspect and colour; the spurious attribute is the
    background (0: textured "land", 1: "water"). ``group_id = 2 * label + background``; groups
    0 and 3 are the majority groups. The training split follows Waterbirds' proportions
    (3498 / 184 / 56 / 1057 of 4795, scaled to ``n``); val and test are balanced (``n // 4``
    per group). Images are float32 in [0, 1], deterministic in ``(split, seed)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: generator seed; each split draws from its own stream.
        n: number of images (default 4795 for train, 1200 for val/test).
        group_counts: explicit per-group counts, overriding ``n`` and the proportions
            (e.g. ``(n, n, n, n)`` for a balanced training set).
        image_size: side length ``S`` of the square images.
        noise_std: std of the per-pixel Gaussian noise added last.
        transform: optional callable applied to each image in ``__getitem__``.

    Attributes:
        images: ``[N, 3, S, S]`` float32; labels: ``[N]`` int64; group_ids: ``[N]`` int64;
        backgrounds: ``[N]`` int64; shapes: ``[N]`` int64 (0..3); num_groups: 4; num_classes: 2.

    Example:
        >>> ds = SynthWaterbirds("train", seed=0)
        >>> ds.images.shape, ds.group_counts().tolist()
        (torch.Size([4795, 3, 32, 32]), [3498, 184, 56, 1057])
        >>> image, label, group_id = ds[0]
        >>> int(group_id) == 2 * int(label) + int(ds.backgrounds[0])
        True
    """

    num_groups = 4
    num_classes = 2
    group_names = SYNTH_GROUP_NAMES

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        *,
        n: Optional[int] = None,
        group_counts: Optional[Sequence[int]] = None,
        image_size: int = 32,
        noise_std: float = 0.05,
        transform: Optional[Callable] = None,
    ):
        split_index = _check_split(split)
        if group_counts is None:
            if n is None:
                n = sum(WATERBIRDS_TRAIN_COUNTS) if split == "train" else 1200
            if n < 4:
                raise ValueError(f"n must be >= 4, got {n}")
            fractions = WATERBIRDS_TRAIN_COUNTS if split == "train" else (1, 1, 1, 1)
            group_counts = _split_counts(n, fractions)
        group_counts = [int(c) for c in group_counts]
        if len(group_counts) != 4 or min(group_counts) < 0 or sum(group_counts) == 0:
            raise ValueError(f"group_counts must be 4 non-negative counts with a positive sum, got {group_counts}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.split, self.seed, self.transform = split, seed, transform
        gen = torch.Generator().manual_seed(1_000_003 * int(seed) + split_index)

        group_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(group_counts))
        group_ids = group_ids[torch.randperm(group_ids.numel(), generator=gen)]  # [N] int64
        labels, backgrounds = group_ids // 2, group_ids % 2
        n_total = group_ids.numel()
        shapes = 2 * labels + torch.randint(0, 2, (n_total,), generator=gen)  # [N] int64

        background = _backgrounds(backgrounds, image_size, gen)  # [N, 3, S, S]
        mask = _shape_masks(shapes, image_size, gen)[:, None]  # [N, 1, S, S]
        # Foreground colour independent of label and background: any hue, mid-to-high value.
        fg_colour = 0.15 + 0.85 * torch.rand(n_total, 3, 1, 1, generator=gen)
        images = background * (1 - mask) + fg_colour * mask
        images = images + noise_std * torch.randn(images.shape, generator=gen)
        self.images = images.clamp_(0.0, 1.0).contiguous()  # [N, 3, S, S] float32
        self.labels = labels  # [N] int64
        self.group_ids = group_ids  # [N] int64
        self.backgrounds = backgrounds  # [N] int64
        self.shapes = shapes  # [N] int64

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], self.group_ids[index]

    def group_counts(self) -> torch.Tensor:
        """``[4]`` int64: number of images per group."""
        return torch.bincount(self.group_ids, minlength=self.num_groups)


# --------------------------------------------------------------------------------------------
# Rare spurious patterns (Yang et al., 2022)
# --------------------------------------------------------------------------------------------

#: Pattern names: S1/S2/S3 set a 1x1/3x3/5x5 bottom-right corner square to the maximum value;
#: R1/R2/R3 add ``a * u`` (a = 0.25/0.5/1.0, one fixed ``u ~ U[0, 1]`` per seed) and clip.
PATTERNS = ("S1", "S2", "S3", "R1", "R2", "R3")
_SQUARE_SIZES = {"S1": 1, "S2": 3, "S3": 5}
_NOISE_SCALES = {"R1": 0.25, "R2": 0.5, "R3": 1.0}


def add_pattern(
    images: torch.Tensor, pattern: str = "S2", seed: int = 0, max_value: float = 1.0, min_value: float = 0.0
) -> torch.Tensor:
    """Return a copy of ``images`` (``[N, C, H, W]`` or ``[C, H, W]``, values in [min, max]) with the pattern.

    ``S1``/``S2``/``S3``: the bottom-right 1x1/3x3/5x5 square of every channel set to ``max_value``.
    ``R1``/``R2``/``R3``: ``clip(x + a * u, min_value, max_value)`` with ``a`` = 0.25/0.5/1.0 and
    ``u ~ U[0, 1]`` of shape ``[C, H, W]`` drawn once from ``seed`` (the same ``u`` for every image).

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> add_pattern(x, "S2").sum().item()  # 2 images x 3 channels x 9 pixels
        54.0
        >>> torch.equal(add_pattern(x, "R1", seed=3), add_pattern(x, "R1", seed=3))
        True
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4) or not images.is_floating_point():
        raise ValueError(
            "images must be a float tensor [N, C, H, W] or [C, H, W], got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape {list(getattr(images, 'shape', []))}"
        )
    out = images.clone()
    if pattern in _SQUARE_SIZES:
        k = _SQUARE_SIZES[pattern]
        if k > min(images.shape[-2:]):
            raise ValueError(f"pattern {pattern} needs images of at least {k}x{k}, got {list(images.shape[-2:])}")
        out[..., -k:, -k:] = max_value
        return out
    if pattern in _NOISE_SCALES:
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(images.shape[-3:], generator=gen, dtype=torch.float32)  # [C, H, W]
        u = u.to(device=images.device, dtype=images.dtype)
        return (out + _NOISE_SCALES[pattern] * u).clamp_(min_value, max_value)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


class PatternedDataset(torch.utils.data.Dataset):
    """``base`` with ``pattern`` added to ``n`` randomly chosen images of ``target_class``.

    Labels and group ids are unchanged. ``base`` needs ``.images``/``.labels``/``.group_ids``
    tensors (e.g. :class:`SynthWaterbirds`, or one with ``group_counts=(k, k, k, k)`` for a plain
    class-balanced set). The poisoned indices are ``poisoned_indices`` (``[n]`` int64) and
    ``is_poisoned`` is a ``[N]`` bool mask.

    Example:
        >>> base = SynthWaterbirds("train", n=100)
        >>> ds = PatternedDataset(base, target_class=1, n=5, pattern="S3", seed=0)
        >>> len(ds), int(ds.is_poisoned.sum()), bool((ds.labels[ds.poisoned_indices] == 1).all())
        (100, 5, True)
        >>> bool((ds.images[ds.poisoned_indices][..., -5:, -5:] == 1).all())
        True
    """

    def __init__(self, base, target_class: int, n: int, pattern: str = "S2", seed: int = 0):
        for attr in ("images", "labels", "group_ids"):
            if not isinstance(getattr(base, attr, None), torch.Tensor):
                raise ValueError(f"base must have a .{attr} tensor (e.g. SynthWaterbirds); got {type(base).__name__}")
        candidates = torch.nonzero(base.labels == target_class).flatten()
        if not 0 <= n <= candidates.numel():
            raise ValueError(f"n must lie in [0, {candidates.numel()}] (images of class {target_class}), got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:n]].sort().values
        self.images = base.images.clone()  # [N, C, H, W]
        if n:
            self.images[chosen] = add_pattern(base.images[chosen], pattern, seed=seed)
        self.labels, self.group_ids = base.labels, base.group_ids
        self.poisoned_indices = chosen  # [n] int64
        self.is_poisoned = torch.zeros(len(self.labels), dtype=torch.bool)
        self.is_poisoned[chosen] = True
        self.target_class, self.pattern, self.seed, self.n = target_class, pattern, seed, n
        self.num_groups = getattr(base, "num_groups", int(base.group_ids.max()) + 1)
        self.group_names = getattr(base, "group_names", None)
        self.transform = getattr(base, "transform", None)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], self.group_ids[index]


@torch.no_grad()
def spurious_score(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_class: int,
    pattern: str,
    threshold: float = 0.1,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Fraction of test images not of ``target_class`` whose ``p_target`` rises by more than ``threshold``
    when the pattern is added: ``mean[p_c(x + pattern) - p_c(x) > threshold]`` (Yang et al., 2022).

    Runs ``model`` in eval mode (its mode is restored) on the device of its parameters. ``seed``
    must be the one the pattern was trained with (it fixes ``u`` for R1/R2/R3).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 2, (20,))
        >>> 0.0 <= spurious_score(model, x, y, target_class=1, pattern="S3") <= 1.0
        True
    """
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images [N, ...] and labels [N], got {list(images.shape)} and {list(labels.shape)}")
    others = images[labels != target_class]
    if others.shape[0] == 0:
        raise ValueError(f"no test images outside target_class {target_class}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, others.shape[0], batch_size):
            clean = others[start:start + batch_size]
            patched = add_pattern(clean, pattern, seed=seed)
            p_clean = torch.softmax(model(clean.to(device)).float(), dim=1)[:, target_class]
            p_patched = torch.softmax(model(patched.to(device)).float(), dim=1)[:, target_class]
            hits += int((p_patched - p_clean > threshold).sum())
    finally:
        model.train(was_training)
    return hits / others.shape[0]


# --------------------------------------------------------------------------------------------
# Image files: transforms
# --------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor(image, mean, std) -> torch.Tensor:
    """PIL RGB image -> ``[3, H, W]`` float32, normalized with ``mean``/``std``."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class ImageNetEvalTransform:
    """Resize the shorter side to ``resize`` (bilinear), center-crop ``size``, normalize.

    Takes a PIL image and returns ``[3, size, size]`` float32.

    Example:
        >>> from PIL import Image
        >>> ImageNetEvalTransform()(Image.new("RGB", (40, 30))).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, size: int = 224, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if size > resize:
            raise ValueError(f"size ({size}) must not exceed resize ({resize})")
        self.size, self.resize, self.mean, self.std = size, resize, mean, std

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.resize, round(w * scale)), max(self.resize, round(h * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return _to_normalized_tensor(image, self.mean, self.std)


class ImageNetTrainTransform:
    """Random resized crop to ``size`` (area 8-100%, aspect 3/4-4/3), horizontal flip (p=0.5), normalize.

    Randomness comes from the global torch RNG (so ``torch.manual_seed`` fixes it).

    Example:
        >>> from PIL import Image
        >>> _ = torch.manual_seed(0)
        >>> ImageNetTrainTransform(size=32)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.scale, self.ratio, self.mean, self.std = size, scale, ratio, mean, std

    def _crop_box(self, w: int, h: int) -> Tuple[int, int, int, int]:
        area = w * h
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
            cw, ch = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(torch.randint(0, w - cw + 1, (1,)).item())
                top = int(torch.randint(0, h - ch + 1, (1,)).item())
                return left, top, cw, ch
        # Fallback: the largest central crop within the aspect-ratio range.
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            cw, ch = round(h * self.ratio[1]), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        left, top, cw, ch = self._crop_box(*image.size)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if torch.rand(1).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_normalized_tensor(image, self.mean, self.std)


def imagenet_eval_transform(size: int = 224, resize: int = 256) -> ImageNetEvalTransform:
    """The standard evaluation transform: resize ``resize``, center-crop ``size``, normalize."""
    return ImageNetEvalTransform(size, resize)


def imagenet_train_transform(size: int = 224) -> ImageNetTrainTransform:
    """The standard training transform: random resized crop ``size``, horizontal flip, normalize."""
    return ImageNetTrainTransform(size)


# --------------------------------------------------------------------------------------------
# Image files: datasets
# --------------------------------------------------------------------------------------------


def _read_csv(path: str) -> Tuple[List[str], List[Dict[str, str]]]:
    if not os.path.isfile(path):
        raise DatasetFileError(f"metadata file not found: {path!r}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = [c.strip() for c in (reader.fieldnames or [])]
    rows = [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None} for row in rows]
    return columns, rows


def _require_columns(path: str, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path!r} lacks column(s) {missing}; it has {list(columns)}")


def _int_column(path: str, rows, column: str) -> List[int]:
    try:
        return [int(float(row[column])) for row in rows]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r}: column {column!r} must hold integers ({exc})") from exc


class GroupedFileDataset(torch.utils.data.Dataset):
    """Image files with labels and attributes; yields ``(image, label, group_id)``.

    ``group_id = label * num_attrs + attr``. The base of :class:`Waterbirds`, :class:`CelebA`,
    :class:`GroupedCSVDataset` and :class:`GroupedImageFolder`.

    Attributes:
        paths: image file paths; labels, attrs, group_ids: ``[N]`` int64;
        num_classes, num_attrs, num_groups; group_names; transform.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        attrs: Sequence[int],
        num_classes: int,
        num_attrs: int,
        transform: Optional[Callable] = None,
        class_names: Optional[Sequence[str]] = None,
        attr_names: Optional[Sequence[str]] = None,
        check_files: bool = True,
    ):
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)  # [N]
        self.attrs = torch.as_tensor(list(attrs), dtype=torch.int64)  # [N]
        if not (len(self.paths) == self.labels.numel() == self.attrs.numel()):
            raise ValueError("paths, labels and attrs must have the same length")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(self.labels.min())}, {int(self.labels.max())}]")
        if self.attrs.numel() and (int(self.attrs.min()) < 0 or int(self.attrs.max()) >= num_attrs):
            raise ValueError(f"attributes must lie in [0, {num_attrs}), got [{int(self.attrs.min())}, {int(self.attrs.max())}]")
        if check_files:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                raise DatasetFileError(f"{len(missing)} image file(s) missing, e.g. {missing[:3]}")
        self.num_classes, self.num_attrs = int(num_classes), int(num_attrs)
        self.num_groups = self.num_classes * self.num_attrs
        self.group_ids = self.labels * self.num_attrs + self.attrs  # [N] int64
        class_names = list(class_names) if class_names is not None else [f"y{i}" for i in range(num_classes)]
        attr_names = list(attr_names) if attr_names is not None else [f"a{i}" for i in range(num_attrs)]
        self.class_names, self.attr_names = class_names, attr_names
        self.group_names = [f"{c}/{a}" for c in class_names for a in attr_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), int(self.group_ids[index])

    def group_counts(self) -> torch.Tensor:
        """``[num_groups]`` int64: images per group."""
        return torch.bincount(self.group_ids, minlength=self.num_groups)


def _default_transform(transform, split: Optional[str], augment: Optional[bool], image_size: int, resize: int):
    if transform is not None:
        return transform
    if augment is None:
        augment = split == "train"
    return imagenet_train_transform(image_size) if augment else imagenet_eval_transform(image_size, resize)


class Waterbirds(GroupedFileDataset):
    """Waterbirds from a local folder (no download): ``root/metadata.csv`` + the images.

    ``metadata.csv`` has columns ``img_id, img_filename, y, split, place`` (split 0/1/2 =
    train/val/test; ``y`` 0 = landbird, 1 = waterbird; ``place`` 0 = land, 1 = water); images
    are at ``root/<img_filename>``. Groups: 0 landbird/land, 1 landbird/water, 2 waterbird/land,
    3 waterbird/water.

    ``transform=None`` uses :class:`ImageNetTrainTransform` on the train split when ``augment``
    is true (default: ``augment = split == "train"``) and :class:`ImageNetEvalTransform` otherwise.

    Example (on a folder laid out as above)::

        train = Waterbirds("/data/waterbird_complete95_forest2water2", "train")
        image, label, group_id = train[0]   # [3, 224, 224] float32, int, int
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        transform: Optional[Callable] = None,
        augment: Optional[bool] = None,
        image_size: int = 224,
        resize: int = 256,
        check_files: bool = True,
    ):
        split_index = _check_split(split)
        root = os.fspath(root)
        meta = os.path.join(root, "metadata.csv")
        columns, rows = _read_csv(meta)
        _require_columns(meta, columns, ("img_filename", "y", "split", "place"))
        splits = _int_column(meta, rows, "split")
        rows = [row for row, s in zip(rows, splits) if s == split_index]
        super().__init__(
            paths=[os.path.join(root, row["img_filename"]) for row in rows],
            labels=_int_column(meta, rows, "y"),
            attrs=_int_column(meta, rows, "place"),
            num_classes=2,
            num_attrs=2,
            transform=_default_transform(transform, split, augment, image_size, resize),
            class_names=("landbird", "waterbird"),
            attr_names=("land", "water"),
            check_files=check_files,
        )
        self.root, self.split = root, split


class CelebA(GroupedFileDataset):
    """CelebA from a local folder (no download), grouped by ``target`` x ``spurious`` attribute.

    Reads ``root/list_attr_celeba.csv`` (``image_id`` + one column per attribute, values -1/1 or
    0/1) and ``root/list_eval_partition.csv`` (``image_id, partition`` with 0/1/2 =
    train/val/test); images are at ``root/img_align_celeba/<image_id>`` (or one folder deeper,
    ``img_align_celeba/img_align_celeba/``, as some archives unpack). Default: label = Blond_Hair,
    attribute = Male, groups 0 non-blond/female, 1 non-blond/male, 2 blond/female, 3 blond/male.
    Transforms as for :class:`Waterbirds`.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        target: str = "Blond_Hair",
        spurious: str = "Male",
        transform: Optional[Callable] = None,
        augment: Optional[bool] = None,
        image_size: int = 224,
        resize: int = 256,
        check_files: bool = True,
    ):
        split_index = _check_split(split)
        root = os.fspath(root)
        attr_path = os.path.join(root, "list_attr_celeba.csv")
        part_path = os.path.join(root, "list_eval_partition.csv")
        attr_columns, attr_rows = _read_csv(attr_path)
        _require_columns(attr_path, attr_columns, ("image_id", target, spurious))
        part_columns, part_rows = _read_csv(part_path)
        _require_columns(part_path, part_columns, ("image_id", "partition"))
        partition = dict(zip((r["image_id"] for r in part_rows), _int_column(part_path, part_rows, "partition")))
        missing = [r["image_id"] for r in attr_rows if r["image_id"] not in partition]
        if missing:
            raise ValueError(f"{part_path!r} has no partition for {len(missing)} image(s), e.g. {missing[:3]}")
        rows = [r for r in attr_rows if partition[r["image_id"]] == split_index]
        image_dir = os.path.join(root, "img_align_celeba")
        if os.path.isdir(os.path.join(image_dir, "img_align_celeba")):
            image_dir = os.path.join(image_dir, "img_align_celeba")
        if not os.path.isdir(image_dir):
            raise DatasetFileError(f"image folder not found: {image_dir!r}")

        def as_binary(column: str) -> List[int]:
            values = _int_column(attr_path, rows, column)
            if any(v not in (-1, 0, 1) for v in values):
                raise ValueError(f"{attr_path!r}: column {column!r} must hold -1/1 or 0/1")
            return [1 if v == 1 else 0 for v in values]

        super().__init__(
            paths=[os.path.join(image_dir, r["image_id"]) for r in rows],
            labels=as_binary(target),
            attrs=as_binary(spurious),
            num_classes=2,
            num_attrs=2,
            transform=_default_transform(transform, split, augment, image_size, resize),
            class_names=(f"not_{target}", target),
            attr_names=(f"not_{spurious}", spurious),
            check_files=check_files,
        )
        self.root, self.split, self.target, self.spurious = root, split, target, spurious


class GroupedCSVDataset(GroupedFileDataset):
    """A user's own images listed in a CSV: one row per image with a path, a label and an attribute.

    Args:
        csv_path: the CSV file (header row required).
        root: folder the ``path_col`` entries are relative to (absolute paths are kept).
        path_col, label_col, attr_col: column names; labels and attributes are integers >= 0.
        split_col, split: keep only rows whose ``split_col`` equals ``split``; ``split`` may be a
            value of the column (e.g. ``"test"``, ``2``) or ``"train"/"val"/"test"`` for a 0/1/2 column.
        num_classes, num_attrs: default to ``max + 1`` over the whole file (every split alike).
        transform: callable on the PIL image; default :class:`ImageNetEvalTransform`.

    Example (``data.csv``: ``file,y,a,fold`` rows such as ``imgs/001.png,1,0,train``)::

        ds = GroupedCSVDataset("data.csv", root=".", path_col="file", label_col="y", attr_col="a",
                               split_col="fold", split="train")
    """

    def __init__(
        self,
        csv_path: Union[str, os.PathLike],
        root: Union[str, os.PathLike],
        path_col: str,
        label_col: str,
        attr_col: str,
        split_col: Optional[str] = None,
        split: Optional[Union[str, int]] = None,
        transform: Optional[Callable] = None,
        num_classes: Optional[int] = None,
        num_attrs: Optional[int] = None,
        check_files: bool = True,
    ):
        csv_path, root = os.fspath(csv_path), os.fspath(root)
        columns, rows = _read_csv(csv_path)
        _require_columns(csv_path, columns, [path_col, label_col, attr_col] + ([split_col] if split_col else []))
        if (split_col is None) != (split is None):
            raise ValueError("split_col and split must be given together")
        all_labels = _int_column(csv_path, rows, label_col)
        all_attrs = _int_column(csv_path, rows, attr_col)
        num_classes = num_classes if num_classes is not None else (max(all_labels) + 1 if rows else 1)
        num_attrs = num_attrs if num_attrs is not None else (max(all_attrs) + 1 if rows else 1)
        keep = list(range(len(rows)))
        if split_col is not None:
            values = [row[split_col] for row in rows]
            wanted = {str(split)}
            if split in SPLITS:
                wanted.add(str(SPLITS.index(split)))
            keep = [i for i, v in enumerate(values) if v in wanted]
            if not keep:
                raise ValueError(
                    f"no row of {csv_path!r} has {split_col} == {split!r}; values present: {sorted(set(values))[:10]}"
                )
        super().__init__(
            paths=[os.path.join(root, rows[i][path_col]) for i in keep],
            labels=[all_labels[i] for i in keep],
            attrs=[all_attrs[i] for i in keep],
            num_classes=num_classes,
            num_attrs=num_attrs,
            transform=transform if transform is not None else imagenet_eval_transform(),
            check_files=check_files,
        )


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class GroupedImageFolder(GroupedFileDataset):
    """Images laid out as ``root/<label>/<attribute>/<file>`` (any image extension).

    Label and attribute names are the folder names, sorted (e.g. ``0``/``1`` or
    ``landbird``/``waterbird``); the label index is the position of the label folder among the
    sorted label folders, and likewise for attributes (taken over every label folder).
    ``group_id = label * num_attrs + attr``; ``group_names`` are ``"<label>/<attribute>"``.

    Example::

        root/landbird/land/0001.png      -> label 0, attr 0, group 0
        root/landbird/water/0002.png     -> label 0, attr 1, group 1
        root/waterbird/land/0003.png     -> label 1, attr 0, group 2
        ds = GroupedImageFolder("root")
    """

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetFileError(f"folder not found: {root!r}")
        class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not class_names:
            raise ValueError(f"{root!r} has no label folders; expected root/<label>/<attribute>/<image>")
        attr_names = sorted(
            {a for c in class_names for a in os.listdir(os.path.join(root, c)) if os.path.isdir(os.path.join(root, c, a))}
        )
        if not attr_names:
            raise ValueError(f"{root!r} has no attribute folders; expected root/<label>/<attribute>/<image>")
        paths, labels, attrs = [], [], []
        for label, c in enumerate(class_names):
            for attr, a in enumerate(attr_names):
                folder = os.path.join(root, c, a)
                if not os.path.isdir(folder):
                    continue
                for name in sorted(os.listdir(folder)):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(folder, name))
                        labels.append(label)
                        attrs.append(attr)
        if not paths:
            raise ValueError(f"{root!r} holds no images (extensions {IMAGE_EXTENSIONS})")
        super().__init__(
            paths, labels, attrs, num_classes=len(class_names), num_attrs=len(attr_names),
            transform=transform if transform is not None else imagenet_eval_transform(),
            class_names=class_names, attr_names=attr_names, check_files=False,
        )
        self.root = root
