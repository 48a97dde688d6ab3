"""SynthWaterbirds: the embedded spurious-correlation benchmark (procedural, no download)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from spurfast.data._common import (
    SYNTH_GROUP_NAMES,
    InMemoryGroupDataset,
    _check_split,
    resolve_group_counts,
)


# --------------------------------------------------------------------------------------------
# Embedded benchmark
# --------------------------------------------------------------------------------------------


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


class SynthWaterbirds(InMemoryGroupDataset):
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
        group_counts = resolve_group_counts(split, n, group_counts)
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

