"""FashionMNIST: the plain 10-class Fashion-MNIST, read from the Debian package's local files.

* :class:`FashionMNIST` -- ``images [N, 1, 28, 28]`` float32 in [0, 1], ``labels [N]`` 0..9 and
  ``group_ids = labels`` (one group per class); ``n`` draws a class-balanced seeded subset.
* :data:`FASHION_CLASSES` -- the class names, in label order.

The files come from ``apt-get install dataset-fashion-mnist`` (read by
:func:`spurfast.data.textured.load_fashion_mnist`); nothing is downloaded. This is the data of
Yang et al. (2022)'s rare spurious pattern experiments (:mod:`spurfast.rare`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from spurfast.data._common import InMemoryGroupDataset, split_counts
from spurfast.data.textured import load_fashion_mnist

__all__ = ["FashionMNIST", "FASHION_CLASSES", "FASHION_SPLITS"]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
#: Split name -> Fashion-MNIST file (60000 training, 10000 test images).
FASHION_SPLITS = {"train": "train", "test": "t10k"}


class FashionMNIST(InMemoryGroupDataset):
    """Fashion-MNIST's ``"train"`` (60000) or ``"test"`` (10000) split, whole or a balanced subset.

    Args:
        split: ``"train"`` or ``"test"``.
        n: number of images; ``None`` keeps the whole split. Otherwise ``n // 10`` images per
            class (the first ``n % 10`` classes get one more), drawn without replacement by a
            generator seeded from ``(seed, split)``: the subset is a function of
            ``(split, n, seed)`` only. Kept in file order.
        seed: seed of the subset (unused when ``n`` is ``None``).
        root: folder holding the four ``*-ubyte.gz`` files (default the Debian package's
            ``/usr/share/datasets/fashion-mnist``); a missing file raises
            :class:`~spurfast.data.DatasetFileError` naming the package to install.
        transform: optional callable applied to each image in ``__getitem__``.

    Attributes:
        images: ``[N, 1, 28, 28]`` float32 in [0, 1]; labels, group_ids: ``[N]`` int64 (equal);
        source_indices: ``[N]`` int64 indices into the Fashion-MNIST file; group_names,
        label_names: :data:`FASHION_CLASSES`; num_groups, num_classes: 10.

    Example::

        >>> ds = FashionMNIST("test", n=25, seed=1)
        >>> ds.images.shape, ds.group_counts().tolist()
        (torch.Size([25, 1, 28, 28]), [3, 3, 3, 3, 3, 2, 2, 2, 2, 2])
        >>> torch.equal(ds.source_indices, FashionMNIST("test", n=25, seed=1).source_indices)
        True
        >>> image, label, group_id = ds[0]
        >>> int(label) == int(group_id), ds.group_names[int(label)] in FASHION_CLASSES
        (True, True)
    """

    num_groups = 10
    num_classes = 10
    group_names = FASHION_CLASSES
    label_names = FASHION_CLASSES

    def __init__(self, split: str = "train", n: Optional[int] = None, seed: int = 0, root: Optional[str] = None,
                 transform: Optional[Callable] = None):
        if split not in FASHION_SPLITS:
            raise ValueError(f"split must be one of {tuple(FASHION_SPLITS)}, got {split!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < self.num_classes):
            raise ValueError(f"n must be None or an int >= {self.num_classes} (one image per class), got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        all_images, all_labels = load_fashion_mnist(FASHION_SPLITS[split], root)  # [M, 28, 28] uint8, [M] int64
        if n is None:
            indices = torch.arange(all_labels.numel())
        else:
            gen = torch.Generator().manual_seed(1_000_003 * seed + (0 if split == "train" else 7))
            picked = []
            for label, count in enumerate(split_counts(n, [1.0] * self.num_classes)):
                pool = (all_labels == label).nonzero()[:, 0]  # [P] int64
                if count > pool.numel():
                    raise ValueError(f"n={n} asks for {count} images of class {label}, but the {split} split "
                                     f"has only {pool.numel()}")
                picked.append(pool[torch.randperm(pool.numel(), generator=gen)[:count]])
            indices = torch.cat(picked).sort().values
        self.split, self.seed, self.root, self.transform = split, seed, root, transform
        self.source_indices = indices  # [N] int64
        self.images = all_images[indices].float().div_(255.0).unsqueeze(1).contiguous()  # [N, 1, 28, 28] float32
        self.labels = all_labels[indices].clone()  # [N] int64
        self.group_ids = self.labels.clone()  # [N] int64: one group per class
