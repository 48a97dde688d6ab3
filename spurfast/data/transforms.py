"""ImageNet-style transforms written with PIL + torch (no torchvision)."""
from __future__ import annotations

import math
from typing import Tuple

import torch


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
