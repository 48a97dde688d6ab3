"""Datasets with groups: an embedded spurious-correlation benchmark and loaders for Waterbirds,
CelebA and a user's own grouped images.

Every dataset yields ``(image, label, group_id)`` with ``group_id = label * num_attrs + attr``
(for two attributes: groups 0..3 = (y0, a0), (y0, a1), (y1, a0), (y1, a1)).

* :class:`SynthWaterbirds` -- procedurally generated 3x32x32 images, no download: the label
  is a foreground shape (ellipse/plus vs. triangle/square), the spurious attribute a textured
  background ("land" vs. "water") that agrees with the label on ~95% of training images, in
  Waterbirds' training proportions 3498 / 184 / 56 / 1057. Val/test are group-balanced.
* :class:`TexturedFashion` -- the same design from real images, read from local files only:
  a Fashion-MNIST item (tops vs. footwear) pasted on a photographed texture (grass vs. brick)
  shipped with scikit-image; test items and test background crops are disjoint from training's.
* :class:`FashionMNIST` -- the 10-class Fashion-MNIST from the same Debian package, with
  class-balanced seeded subsets (the setting of the rare-pattern experiments).
* :class:`Waterbirds`, :class:`CelebA`, :class:`GroupedCSVDataset`,
  :class:`GroupedImageFolder` -- image files on disk, read through PIL with ImageNet-style
  transforms (:func:`imagenet_eval_transform`, :func:`imagenet_train_transform`).

The rare spurious pattern setup of Yang et al. (2022) lives a layer up, in :mod:`spurfast.rare`.
"""
from __future__ import annotations
from spurfast.data._common import WATERBIRDS_TRAIN_COUNTS, DatasetFileError
from spurfast.data.folders import CelebA, GroupedCSVDataset, GroupedFileDataset, GroupedImageFolder, Waterbirds
from spurfast.data.fashion import FashionMNIST
from spurfast.data.synth import SynthWaterbirds
from spurfast.data.textured import TexturedFashion
from spurfast.data.transforms import (
    ImageNetEvalTransform,
    ImageNetTrainTransform,
    imagenet_eval_transform,
    imagenet_train_transform,
)

__all__ = [
    "SynthWaterbirds",
    "TexturedFashion",
    "FashionMNIST",
    "WATERBIRDS_TRAIN_COUNTS",
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

