"""The benchmark models: the GPU issue's reference configurations, their CPU sizes, and
torchvision-free stand-ins.

Every model is built from one seed the same way for every method, and :func:`prepare_model`
puts it in the state the issue fixes: eval mode, only Linear/Conv weights require grad.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast.bench.environment import error_string

TRACKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class MissingDependency(RuntimeError):
    """A model or method needs a package that is not importable here: skipped, not failed."""


def import_optional(module: str):
    """Import ``module`` or raise :class:`MissingDependency` saying why. Any exception counts:
    a torchvision built for another torch fails with RuntimeError, not ImportError."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise MissingDependency(f"{module} is not importable ({error_string(exc, 300)})") from exc


# ------------------------------------------------------------------------------ models
class MLP(nn.Sequential):
    """Flattened image -> Linear/ReLU stack -> logits (ReLU not in place: BackPACK and Opacus
    hook the Linear outputs, which an in-place ReLU would modify)."""

    def __init__(self, widths: Sequence[int]):
        layers: List[nn.Module] = [nn.Flatten()]
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, in-place ``+=`` and ReLU included."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """A torchvision-free copy of ``torchvision.models.resnet18``: the same modules, names,
    forward and initialisation (the same seed gives the same weights), for machines where
    torchvision cannot be imported.

    Example::

        >>> import torch
        >>> model = ResNet18(num_classes=10).eval()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(isinstance(m, nn.Conv2d) for m in model.modules())
        20
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._in_channels = 64
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation, in its order
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, channels: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_channels != channels:
            downsample = nn.Sequential(nn.Conv2d(self._in_channels, channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(channels))
        blocks = [BasicBlock(self._in_channels, channels, stride, downsample), BasicBlock(channels, channels)]
        self._in_channels = channels
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """The CIFAR-style ResNet-18: :class:`ResNet18` with a 3x3 stride-1 stem and no max-pool,
    so its first stage runs on 32x32 maps (the usual adaptation of torchvision's model)."""
    model = ResNet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _torchvision_resnet18_cifar(num_classes: int) -> nn.Module:
    model = _torchvision_resnet("resnet18", num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A timm-free ViT with timm's ``vit_*_patch16_224`` layers and module names (patch
    embedding conv, class token, learned position embedding, pre-norm blocks whose attention
    calls ``qkv``/``proj`` Linear layers, MLP ratio 4, head on the class token), for machines
    without timm. Initialisation is torch's default, not timm's.

    Example::

        >>> import torch
        >>> model = VisionTransformer(img_size=32, dim=64, depth=2, heads=4, num_classes=2).eval()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 2])
    """

    def __init__(self, img_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 num_classes: int = 2):
        super().__init__()
        tokens = (img_size // patch) ** 2 + 1
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _vit_standin(dim: int, heads: int, tiny: bool) -> nn.Module:
    size = dict(img_size=32, depth=2) if tiny else dict(img_size=224)
    return VisionTransformer(dim=dim, heads=heads, num_classes=2, **size)


def resnet18_width_stack(num_classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-18 widths without the skips: 3->64 stem, then two 3x3 convs per
    stage at 64/128/256/512 channels (stride 2 entering stages 2-4), BatchNorm (eval) and
    ReLU after each conv, global average pool, Linear(512, 10)."""
    layers: List[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    width = 64
    for stage, out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers).eval()


def _torchvision_resnet(name: str, num_classes: int) -> nn.Module:
    return getattr(import_optional("torchvision").models, name)(num_classes=num_classes)


def _timm_vit(name: str, tiny: bool) -> nn.Module:
    timm = import_optional("timm")
    # tiny: the same VisionTransformer and layer kinds, with 2 blocks on 32x32 (4 patches)
    size = dict(img_size=32, depth=2) if tiny else dict(img_size=224)
    return timm.create_model(name, pretrained=False, num_classes=2, **size)


# ------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model. ``build(tiny)`` and ``input_shape(tiny)``: ``tiny`` shrinks inputs
    and widths for smoke tests and the ``--quick`` rehearsal (the results record it)."""

    name: str
    source: str  # what builds it, for the results
    batch: int  # the GPU issue's batch size
    cpu_batch: Optional[int]  # default batch on CPU; None: not among the CPU defaults
    classes: int
    build: Callable[[bool], nn.Module]
    input_shape: Callable[[bool], Tuple[int, ...]]
    standin: Optional[Tuple[str, Callable[[bool], nn.Module]]] = None  # (source, build) without its library


MODEL_SPECS: Dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        "resnet18", "torchvision.models.resnet18(num_classes=10)", 256, 32, 10,
        build=lambda tiny: _torchvision_resnet("resnet18", 10),
        input_shape=lambda tiny: (3, 32, 32),
        standin=("spurfast.bench.models.ResNet18(num_classes=10), torchvision-free stand-in",
                 lambda tiny: ResNet18(num_classes=10)),
    ),
    "resnet18_cifar": ModelSpec(
        "resnet18_cifar", "torchvision.models.resnet18(num_classes=10), 3x3 stride-1 stem, no max-pool", 256, 32, 10,
        build=lambda tiny: _torchvision_resnet18_cifar(10),
        input_shape=lambda tiny: (3, 32, 32),
        standin=("spurfast.bench.models.resnet18_cifar(num_classes=10), torchvision-free stand-in",
                 lambda tiny: resnet18_cifar(num_classes=10)),
    ),
    "resnet50": ModelSpec(
        "resnet50", "torchvision.models.resnet50(num_classes=2)", 64, None, 2,
        build=lambda tiny: _torchvision_resnet("resnet50", 2),
        input_shape=lambda tiny: (3, 32, 32) if tiny else (3, 224, 224),
    ),
    "vit_small": ModelSpec(
        "vit_small", "timm vit_small_patch16_224, 2 classes", 64, 16, 2,
        build=lambda tiny: _timm_vit("vit_small_patch16_224", tiny),
        input_shape=lambda tiny: (3, 32, 32) if tiny else (3, 224, 224),
        standin=("spurfast.bench.models.VisionTransformer(dim=384, heads=6), timm-free stand-in with timm's layers",
                 lambda tiny: _vit_standin(384, 6, tiny)),
    ),
    "vit_base": ModelSpec(
        "vit_base", "timm vit_base_patch16_224, 2 classes", 32, None, 2,
        build=lambda tiny: _timm_vit("vit_base_patch16_224", tiny),
        input_shape=lambda tiny: (3, 32, 32) if tiny else (3, 224, 224),
        standin=("spurfast.bench.models.VisionTransformer(dim=768, heads=12), timm-free stand-in with timm's layers",
                 lambda tiny: _vit_standin(768, 12, tiny)),
    ),
    "mlp": ModelSpec(
        "mlp", "spurfast.bench.models.MLP 3072-2048-2048-10", 512, 128, 10,
        build=lambda tiny: MLP((64, 32, 32, 10) if tiny else (3072, 2048, 2048, 10)),
        input_shape=lambda tiny: (1, 8, 8) if tiny else (3, 32, 32),
    ),
}
ALL_MODELS = tuple(MODEL_SPECS)
CPU_MODELS = tuple(name for name, spec in MODEL_SPECS.items() if spec.cpu_batch is not None)


def build_model(name: str, tiny: bool = False, allow_standin: bool = False) -> Tuple[nn.Module, str]:
    """(model, description of what built it). Without its library the model's stand-in is
    built when ``allow_standin`` and it has one; otherwise :class:`MissingDependency`."""
    spec = MODEL_SPECS[name]
    try:
        return spec.build(tiny), spec.source
    except MissingDependency as exc:
        if not (allow_standin and spec.standin):
            raise
        source, build = spec.standin
        return build(tiny), f"{source} ({exc})"


def tracked_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Linear/Conv layers whose weights are measured, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TRACKED_TYPES)]


def prepare_model(model: nn.Module) -> nn.Module:
    """Eval mode; only Linear/Conv weights require grad (the same for every method)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in tracked_layers(model):
        m.weight.requires_grad_(True)
    return model
