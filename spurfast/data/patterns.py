"""The rare spurious pattern setup of Yang et al. (2022): patterns, a poisoned dataset, the spurious score."""
from __future__ import annotations


import torch

from spurfast.data._common import InMemoryGroupDataset


# --------------------------------------------------------------------------------------------
# Rare spurious patterns (Yang et al., 2022)
# --------------------------------------------------------------------------------------------

#: Pattern names: S1/S2/S3 set a 1x1/3x3/5x5 bottom-right corner square to the maximum value;
#: R1/R2/R3 add ``a * u`` (a = 0.25/0.5/1.0, one fixed ``u ~ U[0, 1]`` per seed) and clip.
PATTERNS = ("S1", "S2", "S3", "R1", "R2", "R3")
_SQUARE_SIZES = {"S1": 1, "S2": 3, "S3": 5}
_NOISE_SCALES = {"R1": 0.25, "R2": 0.5, "R3": 1.0}


def add_pattern(
    images: torch.Tensor, pattern: str = "S2", seed: int = 0, max_value: float = 1.0, min_value: float = 0.0
) -> torch.Tensor:
    """Return a copy of ``images`` (``[N, C, H, W]`` or ``[C, H, W]``, values in [min, max]) with the pattern.

    ``S1``/``S2``/``S3``: the bottom-right 1x1/3x3/5x5 square of every channel set to ``max_value``.
    ``R1``/``R2``/``R3``: ``clip(x + a * u, min_value, max_value)`` with ``a`` = 0.25/0.5/1.0 and
    ``u ~ U[0, 1]`` of shape ``[C, H, W]`` drawn once from ``seed`` (the same ``u`` for every image).

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> add_pattern(x, "S2").sum().item()  # 2 images x 3 channels x 9 pixels
        54.0
        >>> torch.equal(add_pattern(x, "R1", seed=3), add_pattern(x, "R1", seed=3))
        True
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4) or not images.is_floating_point():
        raise ValueError(
            "images must be a float tensor [N, C, H, W] or [C, H, W], got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape {list(getattr(images, 'shape', []))}"
        )
    out = images.clone()
    if pattern in _SQUARE_SIZES:
        k = _SQUARE_SIZES[pattern]
        if k > min(images.shape[-2:]):
            raise ValueError(f"pattern {pattern} needs images of at least {k}x{k}, got {list(images.shape[-2:])}")
        out[..., -k:, -k:] = max_value
        return out
    if pattern in _NOISE_SCALES:
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(images.shape[-3:], generator=gen, dtype=torch.float32)  # [C, H, W]
        u = u.to(device=images.device, dtype=images.dtype)
        return (out + _NOISE_SCALES[pattern] * u).clamp_(min_value, max_value)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


class PatternedDataset(InMemoryGroupDataset):
    """``base`` with ``pattern`` added to ``n`` randomly chosen images of ``target_class``.

    Labels and group ids are unchanged. ``base`` needs ``.images``/``.labels``/``.group_ids``
    tensors (e.g. :class:`SynthWaterbirds`, or one with ``group_counts=(k, k, k, k)`` for a plain
    class-balanced set). The poisoned indices are ``poisoned_indices`` (``[n]`` int64) and
    ``is_poisoned`` is a ``[N]`` bool mask.

    Example:
        >>> from spurfast.data import SynthWaterbirds
        >>> base = SynthWaterbirds("train", n=100)
        >>> ds = PatternedDataset(base, target_class=1, n=5, pattern="S3", seed=0)
        >>> len(ds), int(ds.is_poisoned.sum()), bool((ds.labels[ds.poisoned_indices] == 1).all())
        (100, 5, True)
        >>> bool((ds.images[ds.poisoned_indices][..., -5:, -5:] == 1).all())
        True
    """

    def __init__(self, base, target_class: int, n: int, pattern: str = "S2", seed: int = 0):
        for attr in ("images", "labels", "group_ids"):
            if not isinstance(getattr(base, attr, None), torch.Tensor):
                raise ValueError(f"base must have a .{attr} tensor (e.g. SynthWaterbirds); got {type(base).__name__}")
        candidates = torch.nonzero(base.labels == target_class).flatten()
        if not 0 <= n <= candidates.numel():
            raise ValueError(f"n must lie in [0, {candidates.numel()}] (images of class {target_class}), got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:n]].sort().values
        self.images = base.images.clone()  # [N, C, H, W]
        if n:
            self.images[chosen] = add_pattern(base.images[chosen], pattern, seed=seed)
        self.labels, self.group_ids = base.labels, base.group_ids
        self.poisoned_indices = chosen  # [n] int64
        self.is_poisoned = torch.zeros(len(self.labels), dtype=torch.bool)
        self.is_poisoned[chosen] = True
        self.target_class, self.pattern, self.seed, self.n = target_class, pattern, seed, n
        self.num_groups = getattr(base, "num_groups", int(base.group_ids.max()) + 1)
        self.group_names = getattr(base, "group_names", None)
        self.transform = getattr(base, "transform", None)



@torch.no_grad()
def spurious_score(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target_class: int,
    pattern: str,
    threshold: float = 0.1,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Fraction of test images not of ``target_class`` whose ``p_target`` rises by more than ``threshold``
    when the pattern is added: ``mean[p_c(x + pattern) - p_c(x) > threshold]`` (Yang et al., 2022).

    Runs ``model`` in eval mode (its mode is restored) on the device of its parameters. ``seed``
    must be the one the pattern was trained with (it fixes ``u`` for R1/R2/R3).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 2, (20,))
        >>> 0.0 <= spurious_score(model, x, y, target_class=1, pattern="S3") <= 1.0
        True
    """
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images [N, ...] and labels [N], got {list(images.shape)} and {list(labels.shape)}")
    others = images[labels != target_class]
    if others.shape[0] == 0:
        raise ValueError(f"no test images outside target_class {target_class}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, others.shape[0], batch_size):
            clean = others[start:start + batch_size]
            patched = add_pattern(clean, pattern, seed=seed)
            p_clean = torch.softmax(model(clean.to(device)).float(), dim=1)[:, target_class]
            p_patched = torch.softmax(model(patched.to(device)).float(), dim=1)[:, target_class]
            hits += int((p_patched - p_clean > threshold).sum())
    finally:
        model.train(was_training)
    return hits / others.shape[0]
