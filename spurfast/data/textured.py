"""TexturedFashion: a Waterbirds built from real images, with nothing downloaded at run time.

The foreground is a Fashion-MNIST item (read from the Debian package ``dataset-fashion-mnist``),
the background a crop of a photographed texture shipped inside the scikit-image wheel
(``skimage/data/grass.png``, ``brick.png``, ``gravel.png``, CC0). Both are read from local files
only: the texture PNGs are opened directly with PIL, never through ``skimage.data``'s fetcher.
"""
from __future__ import annotations

import functools
import gzip
import importlib
import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from spurfast.data._common import DatasetFileError, InMemoryGroupDataset, _check_split, resolve_group_counts

__all__ = ["TexturedFashion", "FASHION_MNIST_DIR", "load_fashion_mnist", "load_texture"]

#: Where the Debian package ``dataset-fashion-mnist`` installs the four idx files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST classes of each super-class label: 0 = tops, 1 = footwear.
TOPS = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt
FOOTWEAR = (5, 7, 9)  # Sandal, Sneaker, Ankle boot
#: Train items come from Fashion-MNIST's training file before this index, val items from it on.
VAL_START = 50_000
TEXTURE_NAMES = ("grass", "brick", "gravel")
TEXTURE_SIZE = 512
#: Background crops of train/val lie in texture rows [0, 384), test crops in rows [384, 512).
TEST_ROW_START = 384
#: Side of a background crop, in texture pixels (uniform integer in this closed range).
CROP_SIDES = (64, 128)
#: Side of the pasted item, as a fraction of the image side (uniform in this range).
ITEM_SIDES = (0.5, 0.85)

_REAL_EXTRA = 'pip install "spurfast[real]"'
_CHUNK = 512  # images composited per step


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _read_idx(path: str) -> np.ndarray:
    """An idx file (``.gz``): uint8 array of the shape its header gives."""
    if not os.path.isfile(path):
        raise DatasetFileError(
            f"Fashion-MNIST file {path} not found; install the Debian package with "
            "`apt-get install dataset-fashion-mnist`, or pass root= a folder holding "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(part: str = "train", root: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``"train"`` (60000) or ``"t10k"`` (10000) file, read from local idx files.

    Returns ``images [N, 28, 28]`` uint8 and ``labels [N]`` int64 (0..9). Cached: the tensors
    are shared between calls, so do not modify them in place.
    """
    if part not in ("train", "t10k"):
        raise ValueError(f"part must be 'train' or 't10k', got {part!r}")
    root = FASHION_MNIST_DIR if root is None else os.fspath(root)
    images = _read_idx(os.path.join(root, f"{part}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(root, f"{part}-labels-idx1-ubyte.gz"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {part} images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@functools.lru_cache(maxsize=None)
def load_texture(name: str) -> torch.Tensor:
    """Texture ``name`` (grass, brick or gravel) from the scikit-image wheel: ``[512, 512]`` float32 in [0, 1]."""
    if name not in TEXTURE_NAMES:
        raise ValueError(f"texture must be one of {TEXTURE_NAMES}, got {name!r}")
    try:
        skimage_data = importlib.import_module("skimage.data")
    except ImportError as exc:
        raise ImportError(
            f"TexturedFashion's backgrounds are textures shipped with scikit-image, which is not importable "
            f"({exc}); install it with {_REAL_EXTRA} (or pip install scikit-image)"
        ) from exc
    from PIL import Image

    # The PNG inside the wheel, opened directly: skimage.data.<name>() would fall back to a
    # download if the file were missing or altered.
    path = os.path.join(os.path.dirname(skimage_data.__file__), f"{name}.png")
    if not os.path.isfile(path):
        raise DatasetFileError(f"{path} not found: this scikit-image does not ship the {name!r} texture")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if pixels.shape != (TEXTURE_SIZE, TEXTURE_SIZE):
        raise ValueError(f"{path}: expected a {TEXTURE_SIZE}x{TEXTURE_SIZE} texture, got {pixels.shape}")
    return torch.from_numpy(pixels)


# --------------------------------------------------------------------------------------------
# Compositing
# --------------------------------------------------------------------------------------------


def _crops(texture: torch.Tensor, boxes: torch.Tensor, size: int, rows: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resamples ``[n, S, S]`` of ``texture [512, 512]`` over ``boxes [n, 4]`` (top, left, h, w).

    Sample points are clamped to pixel centres in ``rows`` (and the full width), so no crop reads
    a pixel outside its region. The texture is first box-filtered by an integer factor so that
    small images do not alias.
    """
    k = max(1, CROP_SIDES[0] // size)
    tex = F.avg_pool2d(texture[None, None], k)[0, 0] if k > 1 else texture  # [T, T]
    side = tex.shape[-1]
    steps = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # [S] in (0, 1)
    top, left, height, width = boxes.float().unbind(1)
    # Pixel-centre coordinates in the original texture, then in the filtered one.
    ys = ((top[:, None] + steps * height[:, None]) / k - 0.5).clamp(rows[0] // k, rows[1] // k - 1)  # [n, S]
    xs = ((left[:, None] + steps * width[:, None]) / k - 0.5).clamp(0, side - 1)
    ys, xs = ys / (side - 1) * 2 - 1, xs / (side - 1) * 2 - 1  # align_corners=True coordinates
    n = boxes.shape[0]
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # [n, S, S, 2]
    # One image of n * S rows: all crops sample the same texture in a single call.
    out = F.grid_sample(tex[None, None], grid.reshape(1, n * size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.reshape(n, size, size)


def _place_items(items: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Items ``[n, 28, 28]`` (float in [0, 1]) resampled into ``boxes [n, 4]`` (top, left, h, w, image
    pixels) of an ``S x S`` canvas, zero outside: ``[n, S, S]``."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5)  # pixel centres
    top, left, height, width = boxes.unbind(1)
    # Normalised item coordinates (align_corners=False): -1 and 1 are the item's outer edges.
    ys = (coords - top[:, None]) / height[:, None] * 2 - 1  # [n, S]
    xs = (coords - left[:, None]) / width[:, None] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # [n, S, S, 2]
    out = F.grid_sample(items[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


class TexturedFashion(InMemoryGroupDataset):
    """Waterbirds from real images: Fashion-MNIST items pasted on photographed textures.

    * **Label:** a Fashion-MNIST super-class, 0 = tops (T-shirt/top, Pullover, Coat, Shirt),
      1 = footwear (Sandal, Sneaker, Ankle boot).
    * **Spurious attribute:** the background texture, 0 = grass, 1 = brick (``textures=``
      may swap in gravel). Both are grayscale photographs of similar mean brightness, tinted
      by the same random colour distribution, so the attribute is carried by the texture alone.
    * **Groups:** ``group_id = 2 * label + background``, as :class:`SynthWaterbirds`: 0
      tops/grass, 1 tops/brick, 2 footwear/grass, 3 footwear/brick; the majority groups are 0
      and 3 (background agrees with label).
    * **Training split:** Waterbirds' proportions 3498 / 184 / 56 / 1057 of 4795, rescaled to
      ``n`` (largest remainders), or ``group_counts`` exactly; val and test are balanced
      (``n // 4`` per group, default ``n`` 1200).
    * **Disjoint sources:** train items come from Fashion-MNIST's training file, indices
      ``[0, 50000)``; val items from its indices ``[50000, 60000)``; test items from its test
      file (``t10k``). Within a set, items are drawn without replacement. Train and val
      background crops lie in texture rows ``[0, 384)``, test crops in rows ``[384, 512)``
      (the bottom quarter of each 512x512 texture); no crop reads a pixel outside its rows.
    * **Composition:** the background is a random square crop (side 64-128 texture pixels,
      bilinearly resized to ``S``) times a random RGB tint in [0.6, 1.1]; the item, resized to a
      random side of 0.5-0.85 ``S`` at a random position inside the image, is its own alpha
      mask (``alpha = min(1, 2 * v)`` for intensity ``v``) and is drawn in a random colour
      shaded by ``v``.

    Images are float32 in [0, 1] (not normalized, like :class:`SynthWaterbirds`), deterministic
    in ``(split, seed)``. Needs ``apt-get install dataset-fashion-mnist`` and scikit-image
    (``pip install "spurfast[real]"``); nothing is downloaded.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: generator seed; each split draws from its own stream.
        n: number of images (default 4795 for train, 1200 for val/test).
        group_counts: explicit per-group counts, overriding ``n`` and the proportions.
        image_size: side length ``S`` of the square images.
        noise_std: std of per-pixel Gaussian noise added last (default none).
        textures: names of the attribute-0 and attribute-1 textures, from ``grass``, ``brick``,
            ``gravel``.
        root: folder holding Fashion-MNIST's four ``*-ubyte.gz`` files (default the Debian
            package's ``/usr/share/datasets/fashion-mnist``).
        transform: optional callable applied to each image in ``__getitem__``.

    Attributes:
        images: ``[N, 3, S, S]`` float32; labels, group_ids, backgrounds: ``[N]`` int64;
        source_split: ``"train"`` or ``"t10k"``, the Fashion-MNIST file the items come from;
        source_indices: ``[N]`` int64 item indices in that file; source_labels: ``[N]`` int64,
        their 10-class labels; crop_boxes: ``[N, 4]`` int64 (top, left, height, width) in texture
        pixels; item_boxes: ``[N, 4]`` float32 (top, left, height, width) in image pixels;
        group_names; num_groups: 4; num_classes: 2.

    Example:
        >>> ds = TexturedFashion("train", seed=0, n=40, image_size=32)
        >>> ds.images.shape, ds.group_counts().tolist()
        (torch.Size([40, 3, 32, 32]), [29, 2, 0, 9])
        >>> image, label, group_id = ds[0]
        >>> int(group_id) == 2 * int(label) + int(ds.backgrounds[0]), ds.group_names[1]
        (True, 'tops/brick')
    """

    num_groups = 4
    num_classes = 2
    label_names = ("tops", "footwear")
    group_names = ("tops/grass", "tops/brick", "footwear/grass", "footwear/brick")

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        *,
        n: Optional[int] = None,
        group_counts: Optional[Sequence[int]] = None,
        image_size: int = 64,
        noise_std: float = 0.0,
        textures: Sequence[str] = ("grass", "brick"),
        root: Optional[str] = None,
        transform: Optional[Callable] = None,
    ):
        split_index = _check_split(split)
        group_counts = resolve_group_counts(split, n, group_counts)
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        textures = tuple(textures)
        if len(textures) != 2 or textures[0] == textures[1] or not set(textures) <= set(TEXTURE_NAMES):
            raise ValueError(f"textures must be two different names from {TEXTURE_NAMES}, got {textures}")
        self.split, self.seed, self.transform, self.textures = split, seed, transform, textures
        if textures != ("grass", "brick"):
            self.group_names = tuple(f"{y}/{t}" for y in self.label_names for t in textures)

        self.source_split = "t10k" if split == "test" else "train"
        fm_images, fm_labels = load_fashion_mnist(self.source_split, root)
        texture_pixels = [load_texture(t) for t in textures]
        gen = torch.Generator().manual_seed(1_000_003 * int(seed) + 17 * split_index + 5)

        group_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(group_counts))
        group_ids = group_ids[torch.randperm(group_ids.numel(), generator=gen)]  # [N] int64
        labels, backgrounds = group_ids // 2, group_ids % 2
        n_total = group_ids.numel()

        # Items: per label, without replacement from that super-class within the split's index range.
        index_range = {"train": (0, VAL_START), "val": (VAL_START, fm_labels.numel()), "test": (0, fm_labels.numel())}
        lo, hi = index_range[split]
        source_indices = torch.empty(n_total, dtype=torch.int64)
        for label, classes in enumerate((TOPS, FOOTWEAR)):
            pool = lo + torch.isin(fm_labels[lo:hi], torch.tensor(classes)).nonzero()[:, 0]  # [P] int64
            where = (labels == label).nonzero()[:, 0]
            if where.numel() > pool.numel():
                raise ValueError(
                    f"{split}: {where.numel()} images of label {label} ({self.label_names[label]}) requested, but "
                    f"Fashion-MNIST's {self.source_split}[{lo}:{hi}] has only {pool.numel()} such items"
                )
            source_indices[where] = pool[torch.randperm(pool.numel(), generator=gen)[: where.numel()]]

        # Background crops: random square boxes inside the split's rows, in texture pixels.
        rows = (TEST_ROW_START, TEXTURE_SIZE) if split == "test" else (0, TEST_ROW_START)
        crop_side = torch.randint(CROP_SIDES[0], CROP_SIDES[1] + 1, (n_total,), generator=gen)
        crop_top = rows[0] + (torch.rand(n_total, generator=gen) * (rows[1] - rows[0] - crop_side + 1)).long()
        crop_left = (torch.rand(n_total, generator=gen) * (TEXTURE_SIZE - crop_side + 1)).long()
        crop_boxes = torch.stack([crop_top, crop_left, crop_side, crop_side], dim=1)  # [N, 4] int64
        # Items: random side and position inside the image, in image pixels.
        item_side = image_size * (ITEM_SIDES[0] + (ITEM_SIDES[1] - ITEM_SIDES[0]) * torch.rand(n_total, generator=gen))
        item_top = (image_size - item_side) * torch.rand(n_total, generator=gen)
        item_left = (image_size - item_side) * torch.rand(n_total, generator=gen)
        item_boxes = torch.stack([item_top, item_left, item_side, item_side], dim=1)  # [N, 4] float32
        tint = 0.6 + 0.5 * torch.rand(n_total, 3, 1, 1, generator=gen)
        fg_colour = 0.15 + 0.85 * torch.rand(n_total, 3, 1, 1, generator=gen)

        images = torch.empty(n_total, 3, image_size, image_size)
        for start in range(0, n_total, _CHUNK):  # in chunks: the sampling grids are [n, S, S, 2]
            part = slice(start, start + _CHUNK)
            background = torch.empty(images[part].shape[0], image_size, image_size)
            for attr, pixels in enumerate(texture_pixels):
                where = (backgrounds[part] == attr).nonzero()[:, 0]
                if where.numel():
                    background[where] = _crops(pixels, crop_boxes[part][where], image_size, rows)
            items = fm_images[source_indices[part]].float().div_(255.0)
            value = _place_items(items, item_boxes[part], image_size)[:, None]  # [n, 1, S, S]
            alpha = (2 * value).clamp_(max=1.0)
            foreground = fg_colour[part] * (0.35 + 0.65 * value)
            images[part] = (background[:, None] * tint[part]).clamp_(max=1.0) * (1 - alpha) + foreground * alpha
        if noise_std > 0:
            images = images + noise_std * torch.randn(images.shape, generator=gen)
        self.images = images.clamp_(0.0, 1.0).contiguous()  # [N, 3, S, S] float32
        self.labels = labels  # [N] int64
        self.group_ids = group_ids  # [N] int64
        self.backgrounds = backgrounds  # [N] int64
        self.source_indices = source_indices  # [N] int64, into Fashion-MNIST's source_split file
        self.source_labels = fm_labels[source_indices]  # [N] int64, 0..9
        self.crop_boxes = crop_boxes  # [N, 4] int64, texture pixels
        self.item_boxes = item_boxes  # [N, 4] float32, image pixels

