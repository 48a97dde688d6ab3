"""Example-tied dropout (Maini et al., "Can Neural Network Memorization Be Localized?", ICML 2023).

A second way to act on memorization, and ground truth for localization: in each chosen layer a
fixed fraction of the output channels, the *generalist* channels, is always on; every other
channel, a *memorization* channel, is on for training example i with probability ``p``, from a
draw seeded by ``(seed, i)`` alone. Training therefore has to store whatever is specific to
example i in the channels tied to it, and at test time (no example index) the memorization
channels are dropped: the network keeps only what the generalist channels learned. Which
channels hold which example is known (:meth:`ExampleTiedDropout.channels_of`), so a
localization score can be checked against it.

Channels are multiplied by 0/1 per sample at the layer's output (``[B, C, ...]``, channel dim
1), without rescaling. Hook a layer whose zero output stays zero downstream, e.g. a BatchNorm
followed by a ReLU (``SmallCNN``'s ``features.bn3``): masking a conv's output *before* its
BatchNorm would leave a dropped channel at the BatchNorm's shift instead of 0. The generalist
channels of a layer with C channels are the first ``round(generalist * C)`` (halves up).

Where the example indices come from, for each forward of the model:

* inside ``with etd.examples(indices):`` -- ``indices [B]`` for every forward in the block;
* inside ``with etd.indexed_inputs():`` -- from the input itself, whose last channel carries the
  index (:meth:`~ExampleTiedDropout.with_index_channel`); the model sees the input without it.
  This serves code that calls ``model(x)`` on its own: :func:`spurfast.train.erm`, the
  attribution scores, the ablation oracle (which replicates inputs, index channel included);
* otherwise there is none: in eval mode the memorization channels are dropped (test time), in
  train mode the forward raises (a training step without indices is a mistake).

With indices, the per-example masks apply in train and eval mode alike (eval mode with indices
reads out what the training examples memorized, with BatchNorm's running statistics).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["ExampleTiedDropout", "MAX_INDEX"]

#: Largest example index the index channel carries exactly (float32 integers).
MAX_INDEX = 2**24 - 1
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _example_seed(seed: int, index: int) -> int:
    """A generator seed from ``(seed, index)``: plain integer arithmetic, the same on every platform."""
    return (seed * _MIX[0] + (index + 1) * _MIX[1] + _MIX[2]) % (2**63 - 1)


def _channels_of_module(name: str, module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"layers: cannot tell how many channels {name!r} ({type(module).__name__}) outputs; "
        "pass layers as {name: channels}"
    )


def _check_indices(indices, arg: str = "indices") -> torch.Tensor:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{arg} must be an integer tensor [B] of example indices, got {type(indices).__name__}")
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"{arg} must be an integer tensor [B], got {indices.dtype} of shape {list(indices.shape)}")
    indices = indices.detach().to("cpu", torch.int64)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) > MAX_INDEX):
        raise ValueError(f"{arg} must lie in [0, {MAX_INDEX}], got range [{int(indices.min())}, {int(indices.max())}]")
    return indices


class ExampleTiedDropout:
    """Example-tied dropout on the outputs of ``layers`` of ``model``; see the module docstring.

    Args:
        model: the network (hooks are added to ``layers`` and, in :meth:`indexed_inputs`, to the model).
        layers: module names, whose channel count is read from ``out_channels``/``out_features``/
            ``num_features``, or ``{module name: channels}``.
        generalist: fraction of each layer's channels always on (the first ``round(generalist * C)``).
        p: probability that a memorization channel is on for a given example.
        seed: seeds every example's draw: example i's channels depend on ``(seed, i)`` only.

    Use as a context manager, or call :meth:`remove`, to take the hooks off.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spurfast.train.example_tied import ExampleTiedDropout
        >>> model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> etd = ExampleTiedDropout(model, ["0"], generalist=0.2, p=0.5, seed=0)
        >>> etd.generalist_channels()
        {'0': [0, 1]}
        >>> x = torch.randn(3, 4)
        >>> with etd.examples(torch.tensor([7, 8, 7])):
        ...     hidden = model[0](x)
        >>> on = hidden != 0
        >>> on[0, 2:].tolist() == [c in etd.channels_of(7)["0"] for c in range(2, 10)], bool((on[0] == on[2]).all())
        (True, True)
        >>> _ = model.eval()
        >>> bool((model[0](x)[:, 2:] == 0).all())   # test time: memorization channels dropped
        True
        >>> etd.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[Sequence[str], Mapping[str, int]],
        generalist: float = 0.2,
        p: float = 0.1,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for arg, value in (("generalist", generalist), ("p", p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{arg} must be a number in [0, 1], got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(layers, str):
            raise ValueError("layers must be a sequence of module names (or {name: channels}), not a single string")
        modules = dict(model.named_modules())
        named = dict(layers) if isinstance(layers, Mapping) else {n: None for n in layers}
        if not named or (not isinstance(layers, Mapping) and len(named) != len(list(layers))):
            raise ValueError(f"layers must name at least one module, each once; got {list(layers)!r}")
        channels: "OrderedDict[str, int]" = OrderedDict()
        for name, count in named.items():
            if name not in modules:
                raise ValueError(f"layers: {name!r} is not a submodule of the model")
            if count is None:
                count = _channels_of_module(name, modules[name])
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"layers: {name!r} must have a positive int channel count, got {count!r}")
            channels[name] = count
        self.model = model
        self.generalist = float(generalist)
        self.p = float(p)
        self.seed = seed
        self.channels = channels  # layer -> C
        self.num_generalist = OrderedDict((n, min(c, int(math.floor(self.generalist * c + 0.5)))) for n, c in channels.items())
        self._offsets: Dict[str, Tuple[int, int]] = {}  # layer -> [start, end) in an example's draw
        start = 0
        for n, c in channels.items():
            width = c - self.num_generalist[n]
            self._offsets[n] = (start, start + width)
            start += width
        self._draw_size = start
        self._cache: Dict[int, torch.Tensor] = {}  # example index -> [draw_size] bool
        self._indices: Optional[torch.Tensor] = None
        self._batch_masks: Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = None
        self._source: Optional[str] = None  # "examples" or "input"
        self._root_handles: List[torch.utils.hooks.RemovableHandle] = []
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in channels]

    # ------------------------------------------------------------------ ground truth
    def _draw(self, index: int) -> torch.Tensor:
        draw = self._cache.get(index)
        if draw is None:
            generator = torch.Generator().manual_seed(_example_seed(self.seed, index))
            draw = torch.rand(self._draw_size, generator=generator, dtype=torch.float64) < self.p
            self._cache[index] = draw
        return draw

    def generalist_channels(self) -> Dict[str, List[int]]:
        """``{layer: channels always on}``."""
        return {n: list(range(g)) for n, g in self.num_generalist.items()}

    def memorization_channels(self) -> Dict[str, List[int]]:
        """``{layer: channels tied to examples}`` (dropped at test time)."""
        return {n: list(range(self.num_generalist[n], c)) for n, c in self.channels.items()}

    def channels_of(self, example_index: int) -> Dict[str, List[int]]:
        """``{layer: the memorization channels on for this example}``, ascending."""
        if isinstance(example_index, bool) or not isinstance(example_index, int) or not 0 <= example_index <= MAX_INDEX:
            raise ValueError(f"example_index must be an int in [0, {MAX_INDEX}], got {example_index!r}")
        draw = self._draw(example_index)
        out = {}
        for n, (a, b) in self._offsets.items():
            out[n] = (draw[a:b].nonzero().flatten() + self.num_generalist[n]).tolist()
        return out

    def masks(self, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{layer: [B, C] bool}``: which channels are on for each example of ``indices [B]``."""
        indices = _check_indices(indices)
        if indices.numel():
            draws = torch.stack([self._draw(int(i)) for i in indices])  # [B, draw_size]
        else:
            draws = torch.zeros(0, self._draw_size, dtype=torch.bool)
        out = {}
        for n, (a, b) in self._offsets.items():
            on = torch.ones(indices.numel(), self.channels[n], dtype=torch.bool)
            on[:, self.num_generalist[n]:] = draws[:, a:b]
            out[n] = on
        return out

    def tie_counts(self, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{layer: [C] int64}``: how many of the examples ``indices`` each channel is tied to (0 for generalist channels)."""
        on = self.masks(indices)
        return {n: torch.cat([torch.zeros(self.num_generalist[n], dtype=torch.int64),
                              m[:, self.num_generalist[n]:].sum(0)]) for n, m in on.items()}

    # ------------------------------------------------------------------ indices
    @contextlib.contextmanager
    def examples(self, indices: torch.Tensor) -> Iterator["ExampleTiedDropout"]:
        """Every forward in the block is of the training examples ``indices [B]`` (in batch order)."""
        self._check_open()
        indices = _check_indices(indices)
        if self._source is not None:
            raise RuntimeError("examples(): example indices are already being supplied (nested examples()/indexed_inputs())")
        self._indices, self._source = indices, "examples"
        try:
            yield self
        finally:
            self._indices, self._source = None, None

    @staticmethod
    def with_index_channel(images: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``images [N, C, ...]`` with one more channel holding each sample's example index.

        ``indices [N]`` defaults to ``0 .. N-1`` (the dataset order). Feed the result to the model
        inside :meth:`indexed_inputs`.
        """
        if not isinstance(images, torch.Tensor) or images.dim() < 2 or not images.is_floating_point():
            raise ValueError("images must be a floating-point tensor [N, C, ...]")
        if indices is None:
            indices = torch.arange(images.shape[0])
        indices = _check_indices(indices)
        if indices.numel() != images.shape[0]:
            raise ValueError(f"indices has {indices.numel()} entries, images {images.shape[0]}")
        if images.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"images must be float32 or float64 to carry indices exactly, got {images.dtype}")
        plane = indices.to(images.device, images.dtype).view((-1, 1) + (1,) * (images.dim() - 2))
        return torch.cat([images, plane.expand((images.shape[0], 1) + tuple(images.shape[2:]))], dim=1)

    @contextlib.contextmanager
    def indexed_inputs(self) -> Iterator["ExampleTiedDropout"]:
        """In the block every call of the model takes inputs with an index channel (see :meth:`with_index_channel`)."""
        self._check_open()
        if self._source is not None:
            raise RuntimeError("indexed_inputs(): example indices are already being supplied")
        self._source = "input"

        def pre_hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 or args[0].shape[1] < 2:
                raise ValueError("indexed_inputs(): the model's first argument must be images [B, C+1, ...] "
                                 "whose last channel holds example indices (ExampleTiedDropout.with_index_channel)")
            x = args[0]
            plane = x[:, -1].reshape(x.shape[0], -1)
            first = plane[:, 0]
            if plane.numel() and (not bool((plane == first.unsqueeze(1)).all()) or not bool((first == first.round()).all())
                                  or float(first.min()) < 0):
                raise ValueError("indexed_inputs(): the input's last channel does not hold example indices "
                                 "(use ExampleTiedDropout.with_index_channel)")
            self._indices = first.detach().to("cpu", torch.int64)
            return (x[:, :-1],) + tuple(args[1:])

        def post_hook(module, args, output):
            self._indices = None

        self._root_handles = [
            self.model.register_forward_pre_hook(pre_hook, prepend=True),
            self.model.register_forward_hook(post_hook, always_call=True),
        ]
        try:
            yield self
        finally:
            for h in self._root_handles:
                h.remove()
            self._root_handles = []
            self._indices, self._source = None, None

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[1] != self.channels[name]:
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"example-tied dropout: layer {name!r} output {shape}, expected [B, {self.channels[name]}, ...]")
            view = (output.shape[0], self.channels[name]) + (1,) * (output.dim() - 2)
            indices = self._indices
            if indices is None:
                if module.training:
                    raise RuntimeError(
                        f"example-tied dropout: layer {name!r} ran in train mode without example indices; wrap the "
                        "forward in etd.examples(indices) or etd.indexed_inputs(), or call model.eval() for test time"
                    )
                on = torch.zeros(self.channels[name], dtype=output.dtype, device=output.device)
                on[: self.num_generalist[name]] = 1
                return output * on.view((1, -1) + (1,) * (output.dim() - 2))
            if indices.numel() != output.shape[0]:
                raise ValueError(
                    f"example-tied dropout: layer {name!r} got a batch of {output.shape[0]} samples but "
                    f"{indices.numel()} example indices"
                )
            if self._batch_masks is None or self._batch_masks[0] is not indices:  # once per forward, for all layers
                self._batch_masks = (indices, self.masks(indices))
            on = self._batch_masks[1][name].to(device=output.device, dtype=output.dtype)
            return output * on.view(view)

        return hook

    def _check_open(self) -> None:
        if not self._handles:
            raise RuntimeError("this ExampleTiedDropout was removed")

    def remove(self) -> None:
        """Take every hook off the model (idempotent)."""
        for h in self._handles + self._root_handles:
            h.remove()
        self._handles, self._root_handles = [], []

    def __enter__(self) -> "ExampleTiedDropout":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        return (f"ExampleTiedDropout(layers={dict(self.channels)}, generalist={self.generalist}, p={self.p}, "
                f"seed={self.seed})")
