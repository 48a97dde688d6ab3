"""Small reference models, and any torchvision/timm model by name.

* :class:`SmallCNN` -- conv-BN-ReLU blocks, global average pool, one linear classifier.
  Layers are named ``features.conv1``, ``features.bn1``, ..., ``classifier``.
* :class:`MLP` -- flatten, ``fc1``, ``fc2``, ... with ReLU, then ``classifier``.
* :func:`create_model` -- ``"small_cnn"``, ``"mlp"``, else a torchvision or timm model name.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["SmallCNN", "MLP", "create_model"]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (widths w, 2w, 4w, 4w; max-pool after blocks 1-3), global
    average pool, linear classifier.

    Args:
        num_classes: outputs of ``classifier``.
        width: channels of the first block ``w``.
        in_channels: input channels.

    Example:
        >>> model = SmallCNN(num_classes=2, width=8)
        >>> model(torch.zeros(5, 3, 32, 32)).shape
        torch.Size([5, 2])
        >>> [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        ['features.conv1', 'features.conv2', 'features.conv3', 'features.conv4']
    """

    def __init__(self, num_classes: int = 2, width: int = 32, in_channels: int = 3):
        super().__init__()
        if num_classes < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes, width and in_channels must be >= 1, got {num_classes}, {width}, {in_channels}"
            )
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers = OrderedDict()
        c_in = in_channels
        for i, c_out in enumerate(widths, start=1):
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if i < len(widths):
                layers[f"pool{i}"] = nn.MaxPool2d(2)
            c_in = c_out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.num_features = c_in

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, 4w]``."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class MLP(nn.Module):
    """Flatten, then ``Linear-ReLU`` per hidden width (``fc1``, ``fc2``, ...), then ``classifier``.

    Example:
        >>> model = MLP(in_features=12, hidden=(16, 8), num_classes=3)
        >>> model(torch.zeros(4, 3, 2, 2)).shape
        torch.Size([4, 3])
        >>> [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        ['fc1', 'fc2', 'classifier']
    """

    def __init__(self, in_features: int = 3 * 32 * 32, hidden: Sequence[int] = (512, 512), num_classes: int = 2):
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"in_features, hidden widths and num_classes must be >= 1, got {in_features}, {tuple(hidden)}, {num_classes}"
            )
        self.flatten = nn.Flatten()
        c_in = in_features
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(c_in, h))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            c_in = h
        self.num_hidden = len(hidden)
        self.num_features = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, hidden[-1]]`` (the flattened input when ``hidden`` is empty)."""
        x = self.flatten(x)
        for i in range(1, self.num_hidden + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def create_model(name: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """Build a model by name.

    ``"small_cnn"`` -> :class:`SmallCNN`, ``"mlp"`` -> :class:`MLP` (``kwargs`` go to the
    constructor). Any other name is looked up in torchvision (``torchvision.models.get_model``)
    and then timm (``timm.create_model``), whichever is installed; ``kwargs`` are passed on
    (e.g. ``pretrained=True`` for timm).

    Example:
        >>> create_model("small_cnn", num_classes=3, width=4).classifier.out_features
        3
    """
    key = name.lower().replace("-", "_")
    if key in ("small_cnn", "smallcnn"):
        return SmallCNN(num_classes=num_classes, **kwargs)
    if key == "mlp":
        return MLP(num_classes=num_classes, **kwargs)

    reasons = []
    try:
        torchvision_models = importlib.import_module("torchvision.models")
    except ImportError as exc:
        reasons.append(f"torchvision is not importable ({exc})")
    else:
        if name in torchvision_models.list_models():
            return torchvision_models.get_model(name, num_classes=num_classes, **kwargs)
        reasons.append("torchvision has no model of that name")
    try:
        timm = importlib.import_module("timm")
    except ImportError as exc:
        reasons.append(f"timm is not importable ({exc})")
    else:
        if timm.is_model(name):
            return timm.create_model(name, num_classes=num_classes, **kwargs)
        reasons.append("timm has no model of that name")
    raise ValueError(f"unknown model {name!r}: not 'small_cnn' or 'mlp', and " + "; ".join(reasons))
