"""Image files on disk: Waterbirds, CelebA, a CSV of your own, or label/attribute folders."""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from spurfast.data._common import DatasetFileError, SPLITS, _check_split
from spurfast.data.transforms import imagenet_eval_transform, imagenet_train_transform


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
