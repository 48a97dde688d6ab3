"""Datasets named by a short spec string, as the ``spurfast`` command takes them:
``synth``, ``textured_fashion``, ``waterbirds:PATH``, ``celeba:PATH`` or ``csv:PATH``.

File datasets are read once through their evaluation transform (no augmentation, so every
pass sees the same images) into memory as a :class:`TensorGroupDataset`, which training,
scoring and tracing then slice directly.
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence

import torch

from spurfast.data._common import DatasetFileError
from spurfast.data.folders import CelebA, GroupedCSVDataset, Waterbirds
from spurfast.data.synth import SynthWaterbirds
from spurfast.data.transforms import imagenet_eval_transform

DATA_KINDS = ("synth", "textured_fashion", "waterbirds", "celeba", "csv")
#: Kinds generated in memory from packaged data, which take no path.
GENERATED_KINDS = ("synth", "textured_fashion")
SPEC_HELP = "synth, textured_fashion, waterbirds:PATH, celeba:PATH, csv:PATH"
#: Columns a ``csv:PATH`` file must have (paths are relative to the CSV's folder).
CSV_COLUMNS = ("path", "label", "attr", "split")
MAX_IN_MEMORY_BYTES = 8 * 2**30


class TensorGroupDataset(torch.utils.data.Dataset):
    """Images, labels and group ids held as tensors: ``images [N, C, H, W]``, ``labels [N]``, ``group_ids [N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                 group_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None):
        if not (images.shape[0] == labels.shape[0] == group_ids.shape[0]):
            raise ValueError(f"images {list(images.shape)}, labels {list(labels.shape)} and group_ids "
                             f"{list(group_ids.shape)} must agree in dim 0")
        self.images, self.labels, self.group_ids = images, labels.long(), group_ids.long()
        self.num_groups = int(num_groups)
        self.num_classes = int(num_classes) if num_classes is not None else int(self.labels.max()) + 1
        self.group_names = list(group_names) if group_names else [f"group {g}" for g in range(self.num_groups)]
        self.transform = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), int(self.group_ids[i])

    def group_counts(self) -> torch.Tensor:
        return torch.bincount(self.group_ids, minlength=self.num_groups)


class DataSpec(NamedTuple):
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_groups: int
    num_classes: int
    group_names: List[str]


def parse_spec(spec: str):
    """``(kind, path)`` of a spec string; ``path`` is ``None`` for ``synth``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: expected one of {SPEC_HELP}; got {spec!r}")
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise ValueError(f"data: unknown kind {kind!r} in {spec!r}; expected one of {SPEC_HELP}")
    if kind in GENERATED_KINDS:
        if path:
            raise ValueError(f"data: {kind!r} takes no path, got {spec!r}")
        return kind, None
    if not path:
        raise ValueError(f"data: {kind!r} needs a path, as in {kind}:PATH")
    if not os.path.exists(path):
        raise DatasetFileError(f"data: {path!r} does not exist")
    return kind, path


def _materialize(dataset, max_samples: Optional[int], seed: int) -> TensorGroupDataset:
    n = len(dataset)
    if n == 0:
        raise ValueError("data: the split is empty")
    order = list(range(n))
    if max_samples is not None and n > max_samples:
        order = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].tolist())
    first = dataset[order[0]][0]
    need = len(order) * first.numel() * 4
    if need > MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f"data: {len(order)} images of shape {list(first.shape)} need {need / 2**30:.1f} GiB in memory; "
            "pass a smaller --image-size or --max-samples"
        )
    images = torch.empty((len(order),) + tuple(first.shape), dtype=torch.float32)
    labels = torch.empty(len(order), dtype=torch.long)
    groups = torch.empty(len(order), dtype=torch.long)
    for j, i in enumerate(order):
        images[j], labels[j], groups[j] = dataset[i]
    return TensorGroupDataset(images, labels, groups, dataset.num_groups, dataset.group_names, dataset.num_classes)


def load_val_split(spec: str, n: int, *, seed: int = 0, image_size: Optional[int] = None):
    """The balanced validation split of a generated kind (``synth``, ``textured_fashion``), from
    the same generator and ``seed`` as :func:`load_data_spec`'s train and test sets (DFR's
    held-out data).

    Example::

        >>> val = load_val_split("synth", 40)
        >>> len(val), val.group_counts().tolist()
        (40, [10, 10, 10, 10])
    """
    kind, _ = parse_spec(spec)
    if kind == "synth":
        return SynthWaterbirds("val", seed=seed, n=n)
    if kind == "textured_fashion":
        from spurfast.data.textured import TexturedFashion

        return TexturedFashion("val", seed=seed, n=n, image_size=64 if image_size is None else image_size)
    raise ValueError(f"data: {kind!r} has no generated validation split (one of {GENERATED_KINDS})")


def load_data_spec(spec: str, *, image_size: Optional[int] = None, max_samples: Optional[int] = None, seed: int = 0,
                   n_train: Optional[int] = None, n_test: Optional[int] = None) -> DataSpec:
    """Train and test sets of a spec (``synth``: :class:`SynthWaterbirds` with ``n_train``/``n_test``;
    ``textured_fashion``: :class:`~spurfast.data.TexturedFashion`, the same, at ``image_size`` 64
    by default).

    ``image_size`` defaults to 224 for file datasets.
    ``csv:PATH`` needs the columns :data:`CSV_COLUMNS` (``split`` holds train/val/test or 0/1/2).
    ``max_samples`` keeps a seeded random subset of each split of a file dataset (for ``synth``:
    generates that many training images, and up to 1200 test images).

    Example::

        >>> spec = load_data_spec("synth", n_train=100, n_test=40)
        >>> len(spec.train), len(spec.test), spec.num_groups
        (100, 40, 4)
    """
    kind, path = parse_spec(spec)
    if kind == "synth":
        if max_samples is not None:
            n_train = n_train or max_samples
            n_test = n_test or min(max_samples, 1200)
        train = SynthWaterbirds("train", seed=seed, n=n_train)
        test = SynthWaterbirds("test", seed=seed, n=n_test)
        return DataSpec(train, test, 4, 2, list(train.group_names))
    if kind == "textured_fashion":
        from spurfast.data.textured import TexturedFashion

        if max_samples is not None:
            n_train = n_train or max_samples
            n_test = n_test or min(max_samples, 1200)
        size = 64 if image_size is None else image_size
        train = TexturedFashion("train", seed=seed, n=n_train, image_size=size)
        test = TexturedFashion("test", seed=seed, n=n_test, image_size=size)
        return DataSpec(train, test, 4, 2, list(train.group_names))
    if image_size is None:
        image_size = 224
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    resize = max(image_size, round(image_size * 256 / 224))
    transform = imagenet_eval_transform(size=image_size, resize=resize)
    if kind == "waterbirds":
        splits = [Waterbirds(path, split, transform=transform) for split in ("train", "test")]
    elif kind == "celeba":
        splits = [CelebA(path, split, transform=transform) for split in ("train", "test")]
    else:
        root = os.path.dirname(os.path.abspath(path))
        splits = [
            GroupedCSVDataset(path, root, *CSV_COLUMNS[:3], split_col=CSV_COLUMNS[3], split=split, transform=transform)
            for split in ("train", "test")
        ]
    train, test = (_materialize(ds, max_samples, seed) for ds in splits)
    return DataSpec(train, test, train.num_groups, train.num_classes, train.group_names)
