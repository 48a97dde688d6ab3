"""Statistics capture: :class:`NeuronStats` records per-sample, per-neuron statistics of a
model's Linear/Conv layers during an ordinary forward/backward.

How it works. Inside ``with stats.record(group_ids):`` each tracked layer runs through an
autograd Function whose backward computes the layer's weight gradient *with* the fused op:
from the per-sample products that also give ``grad_sq`` and the group sums (``direct``), or
as one GEMM beside a cheaper ``grad_sq`` (rank-one Linear, ``gram``), the group sums then
deferred to a bounded workspace (:class:`spurfast.ops.group_grad.DeferredGroupGrad`) and
added when it fills or ``group_grad`` is read. Input and bias gradients are computed as
usual. Outside ``record`` the model is untouched: no hooks are registered and every layer
runs its own ``forward``.

Semantics, per tracked layer and recorded batch of B samples:

* ``last_grad_sq[name] [B, C]``: ``||d l_n / d W[c]||^2``. With ``loss_reduction="mean"``
  the recorded loss is taken to be ``mean_n l_n``, and gradients are rescaled by B so that
  the statistics are those of ``l_n``.
* ``group_grad[name] [G, *W.shape]``: running sum over recorded samples of group g of
  ``d l_n / d W``.
* ``last_act[name] [B, C]``: the layer output's mean over positions, per sample and channel.
* ``last_ablation[name] [B, C]``: the first-order change of ``l_n`` when weight row c is
  zeroed (bias kept), ``-<d l_n / d W[c], W[c]> = -sum_p grad_out[n, c, p] * (y[n, c, p] - b[c])``
  (:func:`spurfast.ops.ablation_stats`); ``ablation_sum[name] [G, C]`` its running per-group sums.
  It needs each layer's output in the backward: spurfast keeps a reference to it (no copy; it
  is often kept anyway by the next layer). If an in-place op changed it (``ReLU(inplace=True)``
  right after a Linear), the pre-bias output is recomputed from the saved input, one extra
  forward-sized product for that layer.
* The recorded objective can be any sum or mean of per-sample terms, e.g. the margin
  (:func:`spurfast.margin`) for scoring; such a backward is for the statistics, not for an
  optimizer step.
* Layers whose inputs couple samples (BatchNorm in train mode upstream) get, for sample n,
  its *contribution* ``x_n``/``grad_out_n`` to the batch gradient; contributions still sum
  to the weight gradient.
* A layer called several times in one forward is exact: its per-sample gradient (the sum
  over calls) is materialised for that layer only. Calling it again after its backward ran
  within the same ``record`` raises, since the combined statistic could no longer be formed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spurfast._extension import warn_once
from spurfast.ops._common import (
    acc_dtype, check_group_ids, choose_method, input_gram_shape, reduce_per_sample_grad, resolve_backend,
)
from spurfast.ops.ablation_stats import ablation_stats
from spurfast.ops.activation_stats import activation_stats, merge_group_moments
from spurfast.ops.conv_grad_stats import conv2d_per_sample_grad, conv_grad_stats_unchecked, conv_padding
from spurfast.ops.group_grad import DeferredGroupGrad
from spurfast.ops.group_row_sums import group_row_sums
from spurfast.ops.linear_grad_stats import (
    as_tokens,
    linear_grad_stats,
    linear_grad_stats_with_ablation,
    linear_per_sample_grad,
)

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
LOSS_REDUCTIONS = ("mean", "sum")
_STATS_FORMAT = 1  # NeuronStats.save's file layout
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module")  # names torch.compile / FSDP1 put in module paths
_STATS_METADATA_KEY = "spurfast.neuron_stats"


def _kind(module: nn.Module) -> Optional[str]:
    """'linear' / 'conv' for layers whose forward is the stock one, else None."""
    for base, kind in ((nn.Linear, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv")):
        if isinstance(module, base) and type(module).forward is base.forward:
            return kind
    return None


class _Layer:
    """One tracked layer: its module and running statistics."""

    def __init__(self, name: str, module: nn.Module, kind: str):
        self.name = name
        self.module = module
        self.kind = kind
        self.weight_shape = _weight_shape(module)
        self.out_channels = self.weight_shape[0]


class _Batch:
    """Statistics of one ``record`` block, folded into the running sums on clean exit."""

    def __init__(self, group_ids: torch.Tensor, num_groups: int, grad_scale: float):
        self.group_ids = group_ids
        self.size = group_ids.shape[0]
        self.num_groups = num_groups
        self.grad_scale = grad_scale
        self.closed = False
        self.forward_calls = 0  # tracked-layer forwards run inside the block, with or without grad
        self._ids_on: Dict[torch.device, torch.Tensor] = {}
        self.grad_calls: Dict[str, int] = {}  # forward calls that will receive a backward
        self.grad_received: Dict[str, int] = {}
        self.grad_done: set = set()
        self.per_sample_grad: Dict[str, torch.Tensor] = {}  # only for layers called several times
        self.grad_sq: Dict[str, torch.Tensor] = {}
        self.group_grad: Dict[str, torch.Tensor] = {}
        # [B, C] one call: its per-sample channel mean; several: the sum over calls of positions * mean
        self.act_sum: Dict[str, torch.Tensor] = {}
        self.act_positions: Dict[str, int] = {}
        self.act_calls: Dict[str, int] = {}
        self.ablation: Dict[str, torch.Tensor] = {}  # [B, C] summed over calls, scaled to l_n
        self.staged: List["DeferredGroupGrad"] = []  # workspaces holding rows of this batch
        self.sample_ids: Optional[torch.Tensor] = None  # [B] int64 on the CPU, from record(sample_ids=)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._ids_on:
            self._ids_on[device] = self.group_ids.to(device, non_blocking=True)
        return self._ids_on[device]


class _LayerStatsFunction(torch.autograd.Function):
    """``y = layer(x)``; backward returns the usual grads, with dW from the fused op."""

    @staticmethod
    def forward(ctx, x, weight, bias, owner, layer, conv_args):
        ctx.owner, ctx.layer, ctx.conv_args = owner, layer, conv_args
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if conv_args is None:
            out = F.linear(x, weight, bias)
        else:
            stride, padding, dilation, groups = conv_args
            conv = F.conv1d if weight.dim() == 3 else F.conv2d
            out = conv(x, weight, bias, stride, padding, dilation, groups)
        ctx.out = ctx.out_version = ctx.bias = None
        # Where the backward forms per-sample products (a Linear on several tokens), the removal
        # effect comes from them and the weight: no output is kept (ViT-S: 116 MB at B=16).
        if owner.track_ablation and not owner._ablation_from_products(layer, x, conv_args):
            # An alias, not save_for_backward: an in-place op on the output later is allowed and
            # detected through the shared version counter (the output is then recomputed).
            ctx.out = out.detach()
            ctx.out_version = ctx.out._version
            ctx.bias = None if bias is None else bias.detach().clone()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # A named scope per layer, so that a torch.profiler trace attributes every op of this
        # backward (input grad, fused statistics, removal effect, dW) to the layer; opened only
        # under an active profiler (a scope costs about 9 us, 40 of them per ResNet-18 step).
        with _scope(f"spurfast.backward:{ctx.layer.name}"):
            return _LayerStatsFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        w = weight.to(grad_out.dtype)
        grad_x = grad_b = None
        if ctx.conv_args is None:
            if needs_x:
                grad_x = grad_out.matmul(w)
            if needs_b:
                grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        elif needs_x or needs_b:
            stride, padding, dilation, groups = ctx.conv_args
            grad_x, _, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x.to(grad_out.dtype), w, [w.shape[0]] if ctx.has_bias else None,
                list(stride), list(padding), list(dilation), False, [0] * (w.dim() - 2), groups,
                [needs_x, False, needs_b],
            )
        output = (ctx.out, ctx.out_version, ctx.bias, weight) if ctx.owner.track_ablation else None
        grad_w = ctx.owner._on_backward(ctx.layer, x, grad_out, ctx.conv_args, output)
        ctx.out = None  # release the output now; a second backward (retain_graph) recomputes it
        if grad_w is not None and needs_w:
            grad_w = grad_w.to(weight.dtype)
        else:
            grad_w = None
        return grad_x, grad_w, grad_b if needs_b else None, None, None, None


class NeuronStats:
    """Per-sample, per-neuron gradient and activation statistics of a model's layers.

    Args:
        model: any ``nn.Module``; its ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers are tracked.
        num_groups: number of groups G; ``group_ids`` passed to :meth:`record` lie in ``[0, G)``.
        loss_reduction: ``"mean"`` (the loss is a mean over the batch, as ``F.cross_entropy``'s
            default) or ``"sum"``; decides the rescaling to per-sample losses ``l_n``.
        backend: ``"auto"``, ``"torch"`` or ``"cpp"``; see :func:`spurfast.build_info`.
        layers: names or modules to track; default every supported layer whose weight
            requires grad. Children of ``nn.MultiheadAttention`` (``out_proj``) are skipped by
            default and rejected when named: it uses their weights without calling them.
            Modules holding weights that are not tracked are listed in ``untracked`` (name ->
            reason); the default selection warns, naming them, when any of them gets gradients.
        track_group_grad: keep ``group_grad`` (``G * |W|`` memory per layer): ``True`` for every
            tracked layer, ``False`` for none, or the names/modules of the layers that keep it
            (the memory option for large models; every other statistic stays on for all layers).
        group_grad_device: where ``group_grad`` lives; default each layer's weight device.
            ``"cpu"`` keeps the ``G * |W|`` sums in host memory for a model on a GPU: each
            batch's group sums are formed on the GPU and copied over once per layer.
        track_activations: keep activation statistics.
        track_ablation: keep the first-order ablation statistic (``last_ablation``,
            ``ablation_sum``).
        group_grad_workspace: for layers whose ``grad_sq`` needs no per-sample product (a
            Linear on one token per sample; the Gram path), the batches' rows are copied into
            a workspace of at most this fraction of the layer's ``group_grad`` size and added
            to ``group_grad`` in one GEMM per group when it is full or read (many batches per
            GEMM instead of ``G x |W|`` of memory traffic per batch). 0 adds every batch.

    Example::

        >>> import torch, torch.nn as nn, torch.nn.functional as F, spurfast as sf
        >>> model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> stats = sf.NeuronStats(model, num_groups=2)
        >>> x, y, group_ids = torch.randn(16, 10), torch.randint(0, 3, (16,)), torch.arange(16) % 2
        >>> with stats.record(group_ids):
        ...     F.cross_entropy(model(x), y).backward()
        >>> stats.last_grad_sq["0"].shape, stats.group_grad["2"].shape
        (torch.Size([16, 8]), torch.Size([2, 3, 8]))
    """

    def __init__(
        self,
        model: nn.Module,
        num_groups: int,
        loss_reduction: str = "mean",
        backend: str = "auto",
        layers: Optional[Sequence[Union[str, nn.Module]]] = None,
        *,
        track_group_grad: Union[bool, Sequence[Union[str, nn.Module]]] = True,
        track_activations: bool = True,
        track_ablation: bool = True,
        group_grad_workspace: float = 0.25,
        group_grad_device: Optional[Union[str, torch.device]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        from spurfast.ops._common import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_groups = num_groups
        self.loss_reduction = loss_reduction
        self.backend = backend
        self.track_activations = track_activations
        self.track_ablation = track_ablation
        if isinstance(group_grad_workspace, bool) or not isinstance(group_grad_workspace, (int, float)) \
                or not group_grad_workspace >= 0:
            raise ValueError(f"group_grad_workspace must be a number >= 0, got {group_grad_workspace!r}")
        self.group_grad_workspace = float(group_grad_workspace)
        try:
            self.group_grad_device = None if group_grad_device is None else torch.device(group_grad_device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"group_grad_device must be a torch.device or a device string such as 'cpu', "
                             f"got {group_grad_device!r} ({exc})") from None
        model = _uncompiled(model)
        self._model_ref = weakref.ref(model)
        self._forwards: Dict[Tuple[str, bool], object] = {}  # see _forward_of
        self._layers: "OrderedDict[str, _Layer]" = self._select_layers(model, layers)
        self._layer_names = list(self._layers)
        self._group_grad_layers = _group_grad_layers(model, self._layers, track_group_grad)
        self.track_group_grad = bool(self._group_grad_layers)  # some layer keeps group_grad
        # name -> why not tracked, for every module holding a weight matrix of its own that
        # requires grad and is not among the tracked layers (frozen ones listed, not warned about)
        self.untracked: Dict[str, str] = _untracked(model, self._layers)
        skipped = {n: r for n, r in self.untracked.items() if not r.startswith("frozen")}
        if layers is None and skipped:
            warnings.warn(
                "spurfast: these modules hold weights that get gradients but are not tracked, so they have no "
                "statistics: " + "; ".join(f"{n!r} ({r})" for n, r in skipped.items()) + " (also in stats.untracked)",
                UserWarning,
                stacklevel=2,
            )
        self._batch: Optional[_Batch] = None
        self._removed = False
        self._detached = False  # loaded from a file without a model (NeuronStats.load)
        self.reset()

    # ------------------------------------------------------------------ layer selection
    @staticmethod
    def _select_layers(model: nn.Module, layers) -> "OrderedDict[str, _Layer]":
        named = _named_modules(model)
        name_of = {id(m): n for n, m in named.items()}
        attention_of = _attention_children(named)
        tied = _tied_weights(named)
        if layers is None:
            # tied layers (a language model's head sharing the embedding) are listed in untracked
            chosen = [
                n for n, m in named.items()
                if _kind(m) is not None and id(m) not in attention_of and m.weight.requires_grad and n not in tied
            ]
        else:
            if isinstance(layers, (str, nn.Module)):
                layers = [layers]
            chosen = []
            for item in layers:
                n = item if isinstance(item, str) else name_of.get(id(item))
                if n is None or n not in named:
                    raise ValueError(f"layer {item!r} is not a submodule of the model")
                m = named[n]
                if id(m) in attention_of:
                    owner = attention_of[id(m)]
                    raise ValueError(
                        f"layer {n!r} belongs to nn.MultiheadAttention "
                        f"{repr(owner) if owner else '(the model itself)'}, which uses its weight directly "
                        "(F.multi_head_attention_forward) without calling the layer, so spurfast would never see "
                        "it run and would record nothing; track other layers (the default selection skips "
                        "attention children), or build the attention from nn.Linear projections it calls"
                    )
                if _kind(m) is None:
                    raise TypeError(
                        f"layer {n!r} ({type(m).__name__}) is not supported: spurfast tracks nn.Linear, "
                        "nn.Conv1d and nn.Conv2d (and subclasses that keep their forward)"
                    )
                if not m.weight.requires_grad:
                    raise ValueError(f"layer {n!r} has a weight with requires_grad=False; it has no gradient to measure")
                chosen.append(n)
        order = {n: i for i, n in enumerate(named)}
        chosen = sorted(set(chosen), key=order.__getitem__)  # module order, whatever order was given
        if not chosen:
            skipped = _untracked(model, OrderedDict())
            raise ValueError(
                "no layer to track: the model has no nn.Linear/nn.Conv1d/nn.Conv2d whose weight requires grad"
                + ("; skipped: " + "; ".join(f"{n!r} ({r})" for n, r in skipped.items()) if skipped else "")
            )
        result: "OrderedDict[str, _Layer]" = OrderedDict()
        for n in chosen:
            m = named[n]
            # An open record() of another NeuronStats replaces forward only until its block exits.
            if "forward" in vars(m) and _recorded_by(m) is None:
                raise ValueError(f"layer {n!r} has its forward replaced on the instance; spurfast cannot track it")
            if n in tied:
                raise ValueError(
                    f"layer {n!r} shares its weight with {tied[n]}; tied weights are not supported "
                    "(statistics would miss the other use)"
                )
            result[n] = _Layer(n, m, _kind(m))
        return result

    @property
    def layer_names(self) -> List[str]:
        """Names of the tracked layers, in module order."""
        return list(self._layer_names)

    @property
    def group_grad_layers(self) -> List[str]:
        """Names of the layers that keep ``group_grad`` (all tracked layers by default)."""
        return [n for n in self._layer_names if n in self._group_grad_layers]

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything recorded so far."""
        if self._detached:
            raise RuntimeError("reset() on a NeuronStats loaded without a model would drop its layers; "
                               "load it with the model (NeuronStats.load(path, model)) to record afresh")
        self.group_count = torch.zeros(self.num_groups, dtype=torch.int64)
        self.grad_sq_sum: Dict[str, torch.Tensor] = {}
        self._group_grad: Dict[str, torch.Tensor] = {}
        self._deferred: Dict[str, DeferredGroupGrad] = {}  # layers whose group sums are added lazily
        self.act_count: Dict[str, torch.Tensor] = {}
        self.act_mean: Dict[str, torch.Tensor] = {}
        self._act_m2: Dict[str, torch.Tensor] = {}
        self.last_grad_sq: Dict[str, torch.Tensor] = {}
        self.last_act: Dict[str, torch.Tensor] = {}
        self.ablation_sum: Dict[str, torch.Tensor] = {}
        self.last_ablation: Dict[str, torch.Tensor] = {}
        self.last_sample_ids: Optional[torch.Tensor] = None
        self._synced: Optional[Dict[str, object]] = None  # the tables at the last all_reduce()
        self._unreduced = False  # recorded (or loaded) something since the last all_reduce()
        for layer in self._layers.values():
            w = layer.module.weight
            self.grad_sq_sum[layer.name] = torch.zeros(self.num_groups, layer.out_channels, dtype=torch.float64, device=w.device)
            if self.track_ablation:
                self.ablation_sum[layer.name] = torch.zeros_like(self.grad_sq_sum[layer.name])
            if layer.name in self._group_grad_layers:
                self._group_grad[layer.name] = torch.zeros((self.num_groups,) + layer.weight_shape, dtype=torch.float32,
                                                           device=self.group_grad_device or w.device)
            if self.track_activations:
                self.act_count[layer.name] = torch.zeros(self.num_groups, dtype=torch.int64, device=w.device)
                self.act_mean[layer.name] = torch.zeros(self.num_groups, layer.out_channels, dtype=torch.float64, device=w.device)
                self._act_m2[layer.name] = torch.zeros_like(self.act_mean[layer.name])

    @property
    def group_grad(self) -> Dict[str, torch.Tensor]:
        """``{layer: [G, *W.shape] float32}``: running per-group sums of ``d l_n / d W`` (exact when
        read; over all ranks under torch.distributed, see :meth:`all_reduce`)."""
        self._reduce_if_distributed()
        return self._flushed_group_grad()

    def _flushed_group_grad(self) -> Dict[str, torch.Tensor]:
        for deferred in self._deferred.values():
            deferred.flush()
        return self._group_grad

    def _reduce_if_distributed(self) -> None:
        """The summaries' automatic :meth:`all_reduce`: when several ranks run and this one
        recorded (or loaded) something since the last reduction."""
        from spurfast import distributed as dist

        if self._unreduced and self._batch is None and dist.world_size() > 1:
            self.all_reduce()

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics: the running tables (``group_grad``'s ``G x |W|`` per
        layer, the ``[G, C]`` sums and moments), the last batch's ``[B, C]`` tensors and the
        deferred group-sum workspaces."""
        tensors = [self.group_count] + [t for _, table in self._tables(flush=False) for t in table.values()]
        tensors += [t for table in (self.last_grad_sq, self.last_act, self.last_ablation) for t in table.values()]
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total + sum(d.workspace_nbytes for d in self._deferred.values())

    @property
    def act_var(self) -> Dict[str, torch.Tensor]:
        """Per-group population variance ``[G, C]`` of the per-sample channel means (0 for empty groups)."""
        self._reduce_if_distributed()
        return {
            n: m2 / self.act_count[n].clamp(min=1).unsqueeze(1).to(m2.dtype) for n, m2 in self._act_m2.items()
        }

    def grad_sq_mean(self) -> Dict[str, torch.Tensor]:
        """Per-group mean of ``grad_sq`` ``[G, C]`` (NaN for groups with no recorded sample)."""
        self._reduce_if_distributed()
        count = self.group_count.to(torch.float64)
        return {n: s / count.to(s.device).unsqueeze(1) for n, s in self.grad_sq_sum.items()}

    def ablation_mean(self) -> Dict[str, torch.Tensor]:
        """Per-group mean of ``last_ablation`` over all recorded samples ``[G, C]`` (NaN for empty groups)."""
        if not self.track_ablation:
            raise RuntimeError("this NeuronStats was created with track_ablation=False")
        self._reduce_if_distributed()
        count = self.group_count.to(torch.float64)
        return {n: s / count.to(s.device).unsqueeze(1) for n, s in self.ablation_sum.items()}

    def all_reduce(self, group=None) -> None:
        """Make the running statistics those of every rank's samples (``torch.distributed``).

        A collective: every rank of ``group`` calls it, with the same layers. Counts, the
        ``[G, C]`` sums and ``group_grad`` are summed over ranks and the activation moments
        merged; afterwards every rank holds the same numbers. Only what each rank recorded
        since the previous call is exchanged, so calling it every epoch counts nothing twice;
        for that it keeps a copy of the reduced tables (``group_grad``'s ``G x |W|``
        included). ``last_*`` (the last batch, per sample) stay rank-local.

        The summaries (:meth:`state_dict`, :meth:`save`, ``group_grad``, :meth:`grad_sq_mean`,
        :meth:`ablation_mean`, ``act_var``) call it by themselves, on the default group, when
        it runs several ranks and this rank recorded something since the last reduction: call
        them on every rank (a summary read on one rank only, after recording, waits for the
        others). Reading them again on one rank after that is local. The tables read directly
        (``grad_sq_sum``, ``act_mean``, ``group_count`` ...) are this rank's until a reduction.
        """
        from spurfast import distributed as dist

        if self._batch is not None:
            raise RuntimeError("all_reduce() called inside record(); leave the record block first")
        dist.require_initialized()
        base = self._synced or {}
        tables = {prefix: table for prefix, table in self._tables()}  # flushes the deferred sums
        reduced: Dict[str, object] = {"group_count": dist.reduce_sum(self.group_count, base.get("group_count"), group)}
        for prefix in ("grad_sq_sum", "ablation_sum", "group_grad"):
            if prefix in tables:
                reduced[prefix] = {n: dist.reduce_sum(t, base.get(prefix, {}).get(n), group)
                                   for n, t in tables[prefix].items()}
        if self.track_activations:
            moments = {}
            for n in self.act_count:
                local = (self.act_count[n], self.act_mean[n], self._act_m2[n])
                before = base.get("act", {}).get(n)
                since = dist.unmerge_moments(local, before) if before is not None else local
                total = dist.reduce_moments(since, group)
                moments[n] = merge_group_moments(*before, *total) if before is not None else total
            reduced["act"] = moments
        self.group_count = reduced["group_count"]
        self.grad_sq_sum = reduced["grad_sq_sum"]
        if "ablation_sum" in reduced:
            self.ablation_sum = reduced["ablation_sum"]
        if "group_grad" in reduced:
            self._group_grad = reduced["group_grad"]
            for n, deferred in self._deferred.items():  # the workspaces add into the new tables
                deferred.out = self._group_grad[n]
        for n, (count, mean, m2) in reduced.get("act", {}).items():
            self.act_count[n], self.act_mean[n], self._act_m2[n] = count, mean, m2
        self._synced = self._snapshot()
        self._unreduced = False

    def state_dict(self) -> Dict[str, object]:
        """Running statistics as a flat dict of tensors plus the settings they depend on
        (reduced over ranks first, :meth:`all_reduce`, when torch.distributed runs several)."""
        self._reduce_if_distributed()
        state: Dict[str, object] = {
            "num_groups": self.num_groups,
            "loss_reduction": self.loss_reduction,
            "layer_names": self.layer_names,
            "group_count": self.group_count.clone(),
        }
        for prefix, table in self._tables():
            for n, t in table.items():
                state[f"{prefix}.{n}"] = t.clone()
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` output; checks layers, groups and shapes first, changes nothing on error.

        Under torch.distributed the state counts as every rank's (what :meth:`state_dict` gives
        there): load the same state on every rank; later reductions add only what comes after."""
        for key in ("num_groups", "loss_reduction", "layer_names", "group_count"):
            if key not in state:
                raise KeyError(f"state dict lacks {key!r}")
        if state["num_groups"] != self.num_groups or list(state["layer_names"]) != self.layer_names:
            raise ValueError(
                f"state dict is for num_groups={state['num_groups']} and layers {list(state['layer_names'])}, "
                f"this NeuronStats has num_groups={self.num_groups} and layers {self.layer_names}"
            )
        if state["loss_reduction"] != self.loss_reduction:
            raise ValueError(f"state dict used loss_reduction={state['loss_reduction']!r}, this one {self.loss_reduction!r}")
        updates = []
        for prefix, table in self._tables():
            for n, t in table.items():
                key = f"{prefix}.{n}"
                if key not in state:
                    raise KeyError(f"state dict lacks {key!r}")
                if tuple(state[key].shape) != tuple(t.shape):
                    raise ValueError(f"{key} has shape {list(state[key].shape)}, expected {list(t.shape)}")
                updates.append((table, n, state[key].to(t.device, t.dtype)))
        self.group_count = state["group_count"].clone().to(torch.int64)
        for table, n, t in updates:
            table[n] = t.clone()
        self._deferred = {}  # everything pending was flushed into the tables just replaced
        self._mark_loaded()

    def _mark_loaded(self) -> None:
        """Loaded tables are every rank's (what :meth:`state_dict` and :meth:`save` give under
        torch.distributed, loaded on each rank to resume): the next reduction exchanges only
        what is recorded after the load."""
        from spurfast import distributed as dist

        self._unreduced = False
        self._synced = self._snapshot() if dist.world_size() > 1 else None

    def _snapshot(self) -> Dict[str, object]:
        """Copies of the running tables in :meth:`all_reduce`'s layout (the tables themselves
        stay in use): the base the next reduction subtracts."""
        snapshot: Dict[str, object] = {"group_count": self.group_count}
        for prefix, table in self._tables(flush=False):  # both callers have just flushed or loaded
            if prefix in ("grad_sq_sum", "ablation_sum", "group_grad"):
                snapshot[prefix] = table
        if self.track_activations:
            snapshot["act"] = {n: (self.act_count[n], self.act_mean[n], self._act_m2[n]) for n in self.act_count}
        return copy.deepcopy(snapshot)

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write the running statistics to a safetensors file (atomically) and return its path.

        Reload with :meth:`NeuronStats.load`. Under torch.distributed this is a collective (the
        statistics are reduced over ranks first, see :meth:`all_reduce`): call it on every rank;
        rank 0 writes the file. ``last_*`` (the last batch) are not saved.
        """
        from spurfast import distributed as dist

        state = self.state_dict()  # reduces over ranks (on every rank) before the write
        path = os.fspath(path)
        if dist.world_size() > 1:
            try:
                if dist.rank() == 0:
                    self._write(state, path)
            finally:  # on return the file is there for every rank (a shared file system)
                torch.distributed.barrier()
            return path
        return self._write(state, path)

    def _write(self, state: Dict[str, object], path: str) -> str:
        from spurfast import __version__
        from spurfast._files import save_safetensors_atomic

        meta = {
            "format": _STATS_FORMAT, "spurfast_version": __version__,
            "num_groups": self.num_groups, "loss_reduction": self.loss_reduction, "layer_names": self.layer_names,
            "group_grad_layers": self.group_grad_layers,
            "track_activations": bool(self.track_activations), "track_ablation": bool(self.track_ablation),
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        return save_safetensors_atomic(tensors, path, metadata={_STATS_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"], model: Optional[nn.Module] = None, *,
             backend: str = "auto", group_grad_workspace: float = 0.25,
             group_grad_device: Optional[Union[str, torch.device]] = None) -> "NeuronStats":
        """Read statistics written by :meth:`save` (safetensors: no code runs while loading).

        With ``model``: a NeuronStats on it, tracking the saved layers with the saved settings,
        holding the saved statistics; it records on from there (checkpoint and resume; under
        torch.distributed load it on every rank). Without: a read-only NeuronStats with the
        saved tables and summaries (``group_grad``, :meth:`grad_sq_mean`, ``act_var`` ...) and
        no model, for analysis (on the CPU); :meth:`record` raises. ``backend``,
        ``group_grad_workspace`` and ``group_grad_device`` are as for the constructor.
        """
        meta, tensors = _read_stats_file(path)
        state: Dict[str, object] = {k: meta[k] for k in ("num_groups", "loss_reduction", "layer_names")}
        state.update(tensors)
        if model is not None:
            stats = cls(model, meta["num_groups"], meta["loss_reduction"], backend, layers=meta["layer_names"],
                        track_group_grad=meta["group_grad_layers"] or False,
                        track_activations=meta["track_activations"], track_ablation=meta["track_ablation"],
                        group_grad_workspace=group_grad_workspace, group_grad_device=group_grad_device)
            stats.load_state_dict(state)
            return stats
        stats = cls.__new__(cls)
        stats.num_groups, stats.loss_reduction, stats.backend = meta["num_groups"], meta["loss_reduction"], backend
        stats.track_activations, stats.track_ablation = meta["track_activations"], meta["track_ablation"]
        stats.group_grad_workspace, stats.group_grad_device = float(group_grad_workspace), None
        stats._model_ref = lambda: None
        stats._forwards, stats._layers = {}, OrderedDict()
        stats._layer_names = list(meta["layer_names"])
        stats._group_grad_layers = set(meta["group_grad_layers"])
        stats.track_group_grad = bool(stats._group_grad_layers)
        stats.untracked = {}
        stats._batch, stats._removed, stats._detached = None, False, False
        stats.reset()  # empty tables of the right kinds (no layers yet); the file fills them below
        stats._detached = True
        stats.group_count = tensors["group_count"].to(torch.int64)
        tables = {"grad_sq_sum": stats.grad_sq_sum, "ablation_sum": stats.ablation_sum, "group_grad": stats._group_grad,
                  "act_count": stats.act_count, "act_mean": stats.act_mean, "act_m2": stats._act_m2}
        for key, t in tensors.items():
            prefix, _, layer = key.partition(".")
            if prefix in tables:
                tables[prefix][layer] = t
        stats._mark_loaded()
        return stats

    def _tables(self, flush: bool = True):
        yield "grad_sq_sum", self.grad_sq_sum
        if self.track_ablation:
            yield "ablation_sum", self.ablation_sum
        if self.track_group_grad:
            yield "group_grad", self._flushed_group_grad() if flush else self._group_grad
        if self.track_activations:
            yield "act_count", self.act_count
            yield "act_mean", self.act_mean
            yield "act_m2", self._act_m2

    def remove(self) -> None:
        """Drop all statistics and detach from the model for good (the model is already untouched)."""
        if self._batch is not None:
            raise RuntimeError("remove() called inside record(); leave the record block first")
        self._removed = True
        self._layers = OrderedDict()
        self._layer_names = []
        self._forwards.clear()
        self.reset()

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def record(self, group_ids: torch.Tensor, loss_scale=None,
               sample_ids: Optional[torch.Tensor] = None) -> Iterator["NeuronStats"]:
        """Record one batch: run forward and ``backward()`` of the batch loss inside the block.

        ``group_ids``: ``[B]`` integer tensor in ``[0, num_groups)``, one per sample of the batch
        (dim 0 of every tracked layer's input). The batch is folded into the running statistics
        when the block exits normally; on an exception, or if a statistic is NaN/Inf (a
        ``FloatingPointError`` naming the layers), the running statistics are left unchanged.
        A block in which no tracked layer ran a forward warns that nothing was recorded.

        ``loss_scale``: the factor the loss was multiplied by before ``backward()``, so that the
        statistics are those of the unscaled loss: a number, a ``torch.amp.GradScaler``
        (``scaler.scale(loss).backward()`` inside the block; its scale is read at entry), or a
        ``(scaler, number)`` pair for a loss divided for gradient accumulation, then scaled. With a
        GradScaler, a batch whose gradients overflowed (the scaler skips that optimizer step)
        is dropped with a warning instead of raising, and the running statistics stay unchanged.

        ``sample_ids``: optional ``[B]`` integer tensor naming each sample (its index in the
        dataset, say), kept as ``last_sample_ids`` beside the ``last_*`` tables. Under
        ``torch.distributed`` those tables stay on the rank that recorded them; the dataset
        indices (a ``DistributedSampler`` hands each rank its own) say which samples they are.

        Two NeuronStats on one model may nest their blocks only if they track disjoint layers
        (each layer's backward goes through one of them); nesting over a shared layer raises.
        """
        if self._removed:
            raise RuntimeError("this NeuronStats was removed; create a new one")
        if self._detached:
            raise RuntimeError("this NeuronStats was loaded without a model, so it cannot record; "
                               "pass the model: NeuronStats.load(path, model)")
        if self._batch is not None:
            raise RuntimeError("record() blocks cannot be nested")
        self._check_layers_free()
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model was garbage-collected")
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be a torch.Tensor of shape [B], got {type(group_ids).__name__}")
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must have shape [B], got {list(group_ids.shape)}")
        group_ids = check_group_ids(group_ids, group_ids.shape[0], self.num_groups)
        if sample_ids is not None:
            if not isinstance(sample_ids, torch.Tensor) or sample_ids.shape != group_ids.shape \
                    or sample_ids.dtype.is_floating_point or sample_ids.dtype.is_complex or sample_ids.dtype == torch.bool:
                raise ValueError(
                    f"sample_ids must be an integer tensor of shape {list(group_ids.shape)} (one per group id), got "
                    + (f"{sample_ids.dtype} {list(sample_ids.shape)}" if isinstance(sample_ids, torch.Tensor)
                       else type(sample_ids).__name__)
                )
        scale, from_scaler = _loss_scale(loss_scale)
        batch_size = group_ids.shape[0]
        grad_scale = (float(batch_size) if self.loss_reduction == "mean" else 1.0) / scale
        batch = _Batch(group_ids, self.num_groups, grad_scale)
        batch.sample_ids = None if sample_ids is None else sample_ids.detach().to("cpu", torch.int64, copy=True)
        self._batch = batch
        patched = []
        folded = False
        try:
            for layer in self._layers.values():
                forward = self._forward_of(layer)
                layer.module.forward = forward
                patched.append((layer.module, forward))
            try:
                yield self
            finally:
                batch.closed = True
            with _scope("spurfast.fold"):  # batch -> running statistics
                try:
                    self._fold(batch)
                    folded = True
                except FloatingPointError as exc:
                    if not from_scaler:
                        raise
                    warnings.warn(f"spurfast: batch dropped, its scaled gradients overflowed ({exc})",
                                  RuntimeWarning, stacklevel=3)
            if batch.forward_calls == 0:
                warnings.warn(
                    "spurfast: no tracked layer ran a forward inside record(), so nothing was recorded for "
                    "this batch; run both the forward and the backward inside the record() block (a graph "
                    "built before the block, or a model not called in it, gives no statistics)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        finally:
            for deferred in batch.staged:  # the deferred group sums keep a batch's rows only if it was folded
                if folded:
                    deferred.commit()
                else:
                    deferred.rollback()
            for module, forward in patched:
                if vars(module).get("forward") is forward:  # leave anything but our own forward alone
                    del module.forward
            self._batch = None

    def _check_layers_free(self) -> None:
        """Raise, before record() changes anything, if a tracked layer's forward is replaced."""
        busy, replaced = [], []
        for layer in self._layers.values():
            if "forward" not in vars(layer.module):
                continue
            other = _recorded_by(layer.module)
            if other is None:
                replaced.append(layer.name)
            elif other[1] == layer.name:
                busy.append(repr(layer.name))
            else:
                busy.append(f"{layer.name!r} (named {other[1]!r} there)")
        if busy:
            raise RuntimeError(
                f"record(): layers [{', '.join(busy)}] are already being recorded by another NeuronStats whose "
                "record() block is open; nested recording of the same layer by two NeuronStats is not "
                "supported (only one of them could receive the layer's backward). Use one NeuronStats "
                "(more groups or layers), or run the record() blocks one after the other; NeuronStats "
                "tracking disjoint layers may nest"
            )
        if replaced:
            raise RuntimeError(
                f"record(): layers {replaced} have their forward replaced on the instance; spurfast cannot "
                "track such a layer (record() would overwrite it); remove the instance forward or track other layers"
            )

    def _forward_of(self, layer: _Layer):
        """The forward a tracked layer runs inside record(): one function object per layer for
        the life of this NeuronStats, reused by every block. (torch 2.13's dynamo guards only on
        an instance ``forward`` being present, not on which: the first record on a compiled model
        recompiles once, later blocks hit the cache; see the README's torch.compile section.)"""
        dynamo = sys.modules.get("torch._dynamo")  # loaded by torch.compile; never imported here
        key = (layer.name, dynamo is not None)
        if key not in self._forwards:
            forward = self._make_forward(layer)
            if dynamo is not None:
                # Traced, the per-layer statistics would be side effects inside a graph: the
                # layer runs eagerly instead, one graph break per tracked layer call.
                forward = dynamo.disable(forward)
                forward._spurfast_recorded_by = (self, layer.name)
            self._forwards[key] = forward
        return self._forwards[key]

    def _make_forward(self, layer: _Layer):
        module = layer.module
        owner = self

        def forward(x: torch.Tensor) -> torch.Tensor:
            batch = owner._batch  # the open block's batch: record() installs this forward only inside it
            if x.shape[0] != batch.size:
                raise ValueError(
                    f"layer {layer.name!r} got an input with {x.shape[0]} samples in dim 0, but record() "
                    f"was given {batch.size} group ids (the batch must be dim 0)"
                )
            batch.forward_calls += 1
            x, conv_args = _prepare_input(module, x) if layer.kind == "conv" else (x, None)
            grad_on = torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
            if grad_on:
                if layer.name in batch.grad_done:
                    raise RuntimeError(
                        f"layer {layer.name!r} was called again after its backward ran in this record(); "
                        "run one forward and one backward per record() block"
                    )
                batch.grad_calls[layer.name] = batch.grad_calls.get(layer.name, 0) + 1
                out = _LayerStatsFunction.apply(x, module.weight, module.bias, owner, layer, conv_args)
            elif conv_args is None:
                out = F.linear(x, module.weight, module.bias)
            else:
                conv = F.conv1d if module.weight.dim() == 3 else F.conv2d
                out = conv(x, module.weight, module.bias, *conv_args)
            if owner.track_activations:
                with _scope(f"spurfast.activations:{layer.name}"):
                    owner._on_activation(layer, batch, out.detach())
            return out

        forward._spurfast_recorded_by = (owner, layer.name)  # lets other NeuronStats recognise it
        return forward

    def _on_activation(self, layer: _Layer, batch: _Batch, out: torch.Tensor) -> None:
        """Keep the call's per-sample channel means ``[B, C]``; the per-group moments of every
        layer are formed at the block's exit, in one :func:`activation_stats` call."""
        dtype = acc_dtype(out.dtype)
        if layer.kind == "linear":  # [B, *, C]: mean over the tokens
            act = out.reshape(out.shape[0], -1, out.shape[-1]).mean(1, dtype=dtype)
            positions = out[0].numel() // out.shape[-1] if out.shape[0] else 1
        else:  # [B, C, *spatial]
            act = out.reshape(out.shape[0], out.shape[1], -1).mean(2, dtype=dtype)
            positions = out[0, 0].numel() if out.shape[0] else 1
        if layer.name in batch.act_sum:
            previous = batch.act_sum[layer.name]
            if batch.act_calls[layer.name] == 1:  # the second call: the first's entry is its mean
                previous = previous * batch.act_positions[layer.name]
            batch.act_sum[layer.name] = previous + act * positions
            batch.act_positions[layer.name] += positions
            batch.act_calls[layer.name] += 1
        else:  # one call (the usual case) keeps its mean as is
            batch.act_sum[layer.name] = act
            batch.act_positions[layer.name] = positions
            batch.act_calls[layer.name] = 1

    def _on_backward(self, layer: _Layer, x: torch.Tensor, grad_out: torch.Tensor, conv_args, output=None) -> Optional[torch.Tensor]:
        """Weight gradient of one call; records the batch statistics as a side effect.

        ``output``: ``(y, version, bias, weight)`` of the call when the ablation statistic is tracked.
        """
        batch = self._batch_of(layer)
        module = layer.module
        if batch is None:
            warn_once(
                "backward-after-record",
                "spurfast: backward ran after its record() block exited; the statistics of that "
                "batch are dropped (call backward inside the block)",
            )
            return _plain_weight_grad(module, x, grad_out, conv_args)
        name = layer.name
        batch.grad_received[name] = batch.grad_received.get(name, 0) + 1
        ids = batch.ids_on(x.device)
        ablation = None
        single_call = batch.grad_calls.get(name, 0) == 1
        method, deferred = self._method(layer, x, grad_out, conv_args) if single_call else (None, False)
        from_products = (output is not None and output[0] is None and single_call
                         and self._ablation_from_products(layer, x, conv_args, (method, deferred)))
        if output is not None and not from_products:
            ablation = self._call_ablation(layer, x, grad_out, conv_args, *output) * batch.grad_scale
        if single_call:
            grouped = layer.name in self._group_grad_layers and not deferred
            num_groups = self.num_groups if grouped else 1
            op_ids = ids if grouped else torch.zeros_like(ids)
            if from_products:
                grad_sq, group_grad, ablation = linear_grad_stats_with_ablation(
                    x, grad_out, output[3], op_ids, num_groups, backend="cpp", check_inputs=False
                )
                ablation = ablation.mul_(batch.grad_scale) if batch.grad_scale != 1.0 else ablation
            elif conv_args is None:
                grad_sq, group_grad = linear_grad_stats(
                    x, grad_out, op_ids, num_groups, backend=self.backend, method=method, check_inputs=False
                )
            else:
                stride, padding, dilation, groups = conv_args
                grad_sq, group_grad = conv_grad_stats_unchecked(
                    x, grad_out, layer.weight_shape, stride, padding, dilation, groups, op_ids, num_groups,
                    self.backend, method,
                )
            grad_w = group_grad[0] if num_groups == 1 else group_grad.sum(0)
            self._store_grad_stats(batch, layer, grad_sq, group_grad if grouped else None)
            if deferred:
                with _scope("spurfast.group_sums"):
                    self._stage_group_rows(batch, layer, x, grad_out, conv_args, ids)
            if ablation is not None:
                batch.ablation[name] = ablation
            return grad_w
        if ablation is not None:  # linear in the weight gradient: the calls add up
            batch.ablation[name] = batch.ablation[name] + ablation if name in batch.ablation else ablation
        # Called several times: the per-sample gradient is the sum over calls, so keep it.
        if conv_args is None:
            per_sample = linear_per_sample_grad(as_tokens(x, "x"), as_tokens(grad_out, "grad_out"))
        else:
            per_sample = _conv_per_sample_grad(module, x, grad_out, conv_args)
        if name in batch.per_sample_grad:
            batch.per_sample_grad[name] += per_sample
        else:
            batch.per_sample_grad[name] = per_sample
        if batch.grad_received[name] == batch.grad_calls[name]:
            self._finish_multi_call(batch, layer)
        return per_sample.sum(0)

    def _method(self, layer: _Layer, x: torch.Tensor, grad_out: torch.Tensor, conv_args) -> Tuple[str, bool]:
        """(method for the fused op, whether this call's group sums go through the deferred
        workspace): deferred only where ``grad_sq`` needs no per-sample product (the rank-one
        Linear case, the Gram path), since per-sample products give the group sums for free."""
        backend = resolve_backend(self.backend, x.device, x.dtype)
        if backend == "torch":  # the reference forms every per-sample gradient anyway
            return "auto", False
        deferrable = layer.name in self._group_grad_layers and self.group_grad_workspace > 0
        shape = layer.weight_shape
        if conv_args is None:
            tokens = _tokens_per_sample(x)
            if tokens == 1:
                return "direct", deferrable
            method = choose_method(tokens, shape[0], shape[1], backend, group_sums=deferrable)
        else:
            groups = conv_args[3]
            method = choose_method(grad_out[0, 0].numel(), shape[0] // groups, math.prod(shape[1:]), backend,
                                   linear=False, group_sums=deferrable, input_gram=input_gram_shape(x, groups))
        return method, deferrable and method == "gram"

    def _ablation_from_products(self, layer: _Layer, x: torch.Tensor, conv_args, method=None) -> bool:
        """Whether this call's removal effect comes from the backward's per-sample products
        (:func:`linear_grad_stats_with_ablation`) rather than from its output: a Linear on
        several tokens per sample whose statistics take the C++ direct path. A function of the
        input's shape, dtype and device alone, so the forward (which then keeps no output) and
        the backward agree; a call the backward handles otherwise recomputes ``W x``.
        ``method``: :meth:`_method`'s answer for this call, where the caller has it."""
        if conv_args is not None or _tokens_per_sample(x) < 2:
            return False
        if resolve_backend(self.backend, x.device, x.dtype) != "cpp" or x.device.type != "cpu":
            return False
        return (method or self._method(layer, x, None, None)) == ("direct", False)

    def _stage_group_rows(self, batch: _Batch, layer: _Layer, x, grad_out, conv_args, ids) -> None:
        """Copy this call's rows into the layer's deferred workspace (committed at a clean exit)."""
        deferred = self._deferred.get(layer.name)
        if deferred is None:
            out = self._group_grad[layer.name]
            workspace = int(self.group_grad_workspace * out.numel() * out.element_size())
            deferred = self._deferred[layer.name] = DeferredGroupGrad(out, conv_args, workspace)
        dtype = acc_dtype(x.dtype)
        if conv_args is None:  # rows are tokens: [B * T, D] and [B * T, C]
            tokens = _tokens_per_sample(x)
            rows_x, rows_g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
            row_ids = ids if tokens == 1 else ids.repeat_interleave(tokens)
        else:
            rows_x, rows_g, row_ids = x, grad_out, ids
        deferred.stage(rows_x.detach().to(dtype), rows_g.detach().to(dtype), row_ids, batch.grad_scale)
        batch.staged.append(deferred)

    def _call_ablation(self, layer: _Layer, x, grad_out, conv_args, out, version, bias, weight) -> torch.Tensor:
        if out is None or out._version != version:  # released or changed in place: recompute W x
            if out is not None:
                warn_once(
                    f"ablation-inplace-{layer.name}",
                    f"spurfast: the output of layer {layer.name!r} was modified in place after its forward "
                    "(e.g. ReLU(inplace=True)); its ablation statistic recomputes the pre-bias output "
                    "from the saved input (one extra forward-sized product per backward)",
                )
            with torch.no_grad():
                w = weight.to(x.dtype)
                if conv_args is None:
                    out = F.linear(x, w)
                else:
                    conv = F.conv1d if w.dim() == 3 else F.conv2d
                    out = conv(x, w, None, *conv_args)
            bias = None
        channel_dim = -1 if conv_args is None else 1
        return ablation_stats(out, grad_out, bias, channel_dim=channel_dim, backend=self.backend, check_inputs=False)

    def _batch_of(self, layer: _Layer) -> Optional[_Batch]:
        batch = self._batch
        return None if batch is None or batch.closed else batch

    def _finish_multi_call(self, batch: _Batch, layer: _Layer) -> None:
        per_sample = batch.per_sample_grad.pop(layer.name)
        ids = batch.ids_on(per_sample.device)
        if layer.name in self._group_grad_layers:
            grad_sq, group_grad = reduce_per_sample_grad(per_sample, ids, self.num_groups)
        else:
            grad_sq, group_grad = per_sample.flatten(2).square().sum(-1), None
        self._store_grad_stats(batch, layer, grad_sq, group_grad)

    def _store_grad_stats(self, batch: _Batch, layer: _Layer, grad_sq, group_grad) -> None:
        scale = batch.grad_scale
        # the ops return fresh tensors: scale in place
        batch.grad_sq[layer.name] = grad_sq.float().mul_(scale * scale) if scale != 1.0 else grad_sq.float()
        if group_grad is not None:  # kept unscaled: the scale is applied while folding, in one pass
            group_grad = group_grad.reshape((self.num_groups,) + layer.weight_shape)
            # sums kept elsewhere (group_grad_device): copy now, so the batch holds none on the GPU
            batch.group_grad[layer.name] = group_grad.to(self._group_grad[layer.name].device)
        batch.grad_done.add(layer.name)

    def _fold(self, batch: _Batch) -> None:
        """Fold a finished batch into the running statistics, all or nothing.

        Every table is reduced for all layers at once (their ``[B, C]`` tables side by side):
        a few ops per batch instead of a dozen per layer, which on a small model cost more than
        the sums themselves."""
        for name in list(batch.per_sample_grad):  # calls whose backward never came contribute zero
            self._finish_multi_call(batch, self._layers[name])
        any_grad = bool(batch.grad_sq)

        def per_layer(table: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            # A layer the loss did not reach has zero gradient for every sample.
            out = {}
            for layer in self._layers.values():
                t = table.get(layer.name)
                out[layer.name] = t if t is not None else torch.zeros(
                    batch.size, layer.out_channels, device=layer.module.weight.device)
            return out

        last_grad_sq = per_layer(batch.grad_sq) if any_grad else {}
        # full precision, for the float64 sums
        ablation_full = per_layer(batch.ablation) if any_grad and self.track_ablation else {}
        last_ablation = {n: t.float() for n, t in ablation_full.items()}
        act_full = {name: act if batch.act_calls[name] == 1 else act / batch.act_positions[name]
                    for name, act in batch.act_sum.items()}  # full precision, for the float64 moments
        last_act = {n: t.float() for n, t in act_full.items()}
        # Per-group float64 sums of the per-sample tables, read once; a NaN/Inf anywhere in a
        # table leaves its group's sum non-finite, so the sums double as the finiteness check.
        sums, finite = {}, []
        for table, tables in (("grad_sq", last_grad_sq), ("ablation", ablation_full)):
            sums[table] = {}
            for names, flat in _side_by_side(tables):
                flat_sums = group_row_sums(flat, batch.ids_on(flat.device), self.num_groups, backend=self.backend,
                                           check_inputs=False)
                sums[table].update(zip(names, flat_sums.split([tables[n].shape[1] for n in names], dim=1)))
                finite.append(torch.isfinite(flat_sums).all())
        moments = {}  # per-group moments of the channel means, every layer's in one call per device
        for names, flat in _side_by_side(act_full):
            _, count, mean, m2 = activation_stats(flat.unsqueeze(-1), batch.ids_on(flat.device), self.num_groups,
                                                  backend=self.backend, check_inputs=False)
            channels = [act_full[n].shape[1] for n in names]
            moments.update((n, (count, mean_l, m2_l)) for n, mean_l, m2_l in
                           zip(names, mean.split(channels, 1), m2.split(channels, 1)))
            finite.append(torch.isfinite(m2).all())  # a NaN/Inf mean leaves its group's m2 non-finite
        if finite and not bool(torch.stack([f.cpu() for f in finite]).all()):
            checked = list(last_grad_sq.items()) + list(last_act.items()) + list(last_ablation.items())
            bad = [n for n, t in checked if not bool(torch.isfinite(t).all())]
            raise FloatingPointError(
                f"non-finite statistics (NaN/Inf in the activations or gradients) in layers {sorted(set(bad))}; "
                "this batch was not recorded"
            )
        if any_grad:
            counts = torch.bincount(batch.group_ids.cpu(), minlength=self.num_groups)
            _add_all([self.grad_sq_sum[n] for n in sums["grad_sq"]], list(sums["grad_sq"].values()))
            _add_all([self.ablation_sum[n] for n in sums["ablation"]], list(sums["ablation"].values()))
            if self.track_group_grad:
                for name, group_grad in batch.group_grad.items():
                    self._group_grad[name].add_(group_grad, alpha=batch.grad_scale)
            self.group_count += counts
            self.last_sample_ids = batch.sample_ids
            self.last_grad_sq = last_grad_sq
            if self.track_ablation:
                self.last_ablation = last_ablation
        self._merge_moments(moments)
        if last_act:
            self.last_act = last_act
        if any_grad or moments:
            self._unreduced = True

    def _merge_moments(self, moments: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Merge a batch's per-group activation moments into the running ones, every layer on a
        device in one :func:`merge_group_moments` over their channels side by side."""
        by_device: Dict[torch.device, List[str]] = {}
        for name in moments:
            by_device.setdefault(self.act_mean[name].device, []).append(name)
        for device, names in by_device.items():
            if len(names) == 1:
                name = names[0]
                count, mean, m2 = moments[name]
                self.act_count[name], self.act_mean[name], self._act_m2[name] = merge_group_moments(
                    self.act_count[name], self.act_mean[name], self._act_m2[name], count.to(device), mean, m2)
                continue
            channels = [self.act_mean[n].shape[1] for n in names]
            # counts per layer and group, repeated over each layer's channels: [G, sum C]
            count_a = torch.stack([self.act_count[n] for n in names])
            count_b = torch.stack([moments[n][0].to(device) for n in names])
            widths = torch.tensor(channels, device=device)
            _, mean, m2 = merge_group_moments(
                count_a.t().repeat_interleave(widths, dim=1), torch.cat([self.act_mean[n] for n in names], 1),
                torch.cat([self._act_m2[n] for n in names], 1),
                count_b.t().repeat_interleave(widths, dim=1), torch.cat([moments[n][1].to(device) for n in names], 1),
                torch.cat([moments[n][2].to(device) for n in names], 1),
            )
            counts = (count_a + count_b).unbind(0)
            for name, count, mean_l, m2_l in zip(names, counts, mean.split(channels, 1), m2.split(channels, 1)):
                # copies: each layer's running moments own their storage (saved as separate tensors)
                self.act_count[name], self.act_mean[name], self._act_m2[name] = (
                    count.clone(), mean_l.contiguous(), m2_l.contiguous())


def _side_by_side(tables: Dict[str, torch.Tensor]) -> List[Tuple[List[str], torch.Tensor]]:
    """``[B, C_l]`` tables of several layers as one ``[B, sum C_l]`` table per device (columns
    in the dict's order), with the layer names of its columns."""
    by_device: Dict[torch.device, List[str]] = {}
    for name, t in tables.items():
        by_device.setdefault(t.device, []).append(name)
    return [(names, tables[names[0]] if len(names) == 1 else torch.cat([tables[n] for n in names], dim=1))
            for names in by_device.values()]


def _add_all(targets: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    """``targets[i] += values[i]`` for every i, one foreach op where the lists share a device."""
    if not targets:
        return
    if len({t.device for t in targets} | {v.device for v in values}) == 1:
        torch._foreach_add_(targets, values)
        return
    for t, v in zip(targets, values):
        t.add_(v.to(t.device))


def _scope(name: str):
    """A ``torch.profiler`` scope named ``name`` while a profiler runs, else nothing."""
    enabled = getattr(torch.autograd, "_profiler_enabled", None)
    if enabled is None or enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) or a (Distributed)DataParallel
    holds, else ``module``: the layers keep the names the user gave them."""
    while True:
        if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
                or type(module).__name__ == "FullyShardedDataParallel":  # FSDP1's wrapper
            module = module.module
        else:
            return module


def _named_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """``model.named_modules()`` under the user's names: a submodule wrapped by ``torch.compile``
    is named as it was before (no ``_orig_mod.``), and the wrapper itself is left out."""
    named: "OrderedDict[str, nn.Module]" = OrderedDict()
    for n, m in model.named_modules():
        # a torch.compile or FSDP1 wrapper: the module it wraps comes next, under the same name
        if type(m).__name__ in ("OptimizedModule", "FullyShardedDataParallel"):
            continue
        named.setdefault(".".join(part for part in n.split(".") if part not in _WRAPPER_PARTS), m)
    return named


def _attention_children(named: "OrderedDict[str, nn.Module]") -> Dict[int, str]:
    """``{id(child module): name of the nn.MultiheadAttention holding it}``."""
    attention_of: Dict[int, str] = {}
    for n, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            attention_of.update((id(c), n) for c in m.modules() if c is not m)
    return attention_of


def _read_stats_file(path) -> Tuple[Dict[str, object], Dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a :meth:`NeuronStats.save` file, checked for a consistent
    layout (every table of every saved layer, with matching shapes) before anything uses it."""
    import safetensors
    from safetensors import safe_open

    unreadable = getattr(safetensors, "SafetensorError", Exception)  # what a bad header raises

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no statistics file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_STATS_METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except unreadable as exc:
        raise ValueError(f"{path!r} is not a safetensors file: {exc}") from None
    if raw is None:
        raise ValueError(f"{path!r} is not a spurfast NeuronStats file (no {_STATS_METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path!r}: its {_STATS_METADATA_KEY!r} metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != _STATS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r}: NeuronStats format {found!r}, this spurfast reads {_STATS_FORMAT}")
    expected = {"num_groups": int, "loss_reduction": str, "layer_names": list, "group_grad_layers": list,
                "track_activations": bool, "track_ablation": bool}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path!r}: metadata {key!r} must be a {kind.__name__}, got {meta.get(key)!r}")
    groups, layers = meta["num_groups"], meta["layer_names"]
    if groups < 1 or meta["loss_reduction"] not in LOSS_REDUCTIONS or not set(meta["group_grad_layers"]) <= set(layers):
        raise ValueError(f"{path!r}: inconsistent metadata {meta}")
    want = {"group_count"}
    for n in layers:
        want.add(f"grad_sq_sum.{n}")
        if meta["track_ablation"]:
            want.add(f"ablation_sum.{n}")
        if n in meta["group_grad_layers"]:
            want.add(f"group_grad.{n}")
        if meta["track_activations"]:
            want.update(f"{prefix}.{n}" for prefix in ("act_count", "act_mean", "act_m2"))
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise ValueError(f"{path!r}: tensors do not match its layers and settings (missing {missing}, unexpected {extra})")
    if tuple(tensors["group_count"].shape) != (groups,):
        raise ValueError(f"{path!r}: group_count has shape {list(tensors['group_count'].shape)}, expected [{groups}]")
    for n in layers:
        channels = tensors[f"grad_sq_sum.{n}"].shape[1:2]
        shapes = {"grad_sq_sum": (groups,) + tuple(channels), "ablation_sum": (groups,) + tuple(channels),
                  "act_mean": (groups,) + tuple(channels), "act_m2": (groups,) + tuple(channels), "act_count": (groups,)}
        for prefix, shape in shapes.items():
            t = tensors.get(f"{prefix}.{n}")
            if t is not None and (tuple(t.shape) != shape or len(channels) != 1):
                raise ValueError(f"{path!r}: {prefix}.{n} has shape {list(t.shape)}, expected {list(shape)}")
        t = tensors.get(f"group_grad.{n}")
        if t is not None and (t.dim() < 3 or tuple(t.shape[:2]) != (groups,) + tuple(channels)):
            raise ValueError(f"{path!r}: group_grad.{n} has shape {list(t.shape)}, expected [{groups}, C, ...]")
    return meta, tensors


def _tied_weights(named: "OrderedDict[str, nn.Module]") -> Dict[str, List[str]]:
    """``{name of a supported layer: names of the other modules holding its weight}``, for the
    layers whose weight is tied to another module's parameter."""
    owners: Dict[int, List[str]] = {}
    for n, m in named.items():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    tied = {}
    for n, m in named.items():
        if _kind(m) is not None:
            others = [o for o in owners.get(id(m.weight), []) if o != n]
            if others:
                tied[n] = others
    return tied


def _untracked(model: nn.Module, tracked: "OrderedDict[str, _Layer]") -> Dict[str, str]:
    """``{module name: reason}`` for modules with a weight matrix of their own (a parameter
    named ``*weight`` of 2 or more dims) that are not tracked."""
    named = _named_modules(model)
    attention = _attention_children(named)
    tied = _tied_weights(named)
    out: Dict[str, str] = {}
    for n, m in named.items():
        if n in tracked:
            continue
        # weight matrices by name: embeddings of positions or a class token are not layers
        weights = [p for pn, p in m.named_parameters(recurse=False) if pn.endswith("weight") and p.dim() >= 2]
        if not weights:
            continue
        kind = type(m).__name__
        if not any(p.requires_grad for p in weights):
            out[n] = f"frozen {kind}: its weight does not require grad"
        elif isinstance(m, nn.MultiheadAttention):
            out[n] = ("nn.MultiheadAttention: F.multi_head_attention_forward uses in_proj_weight and "
                      "out_proj.weight without calling a Linear; build attention from nn.Linear projections to track it")
        elif id(m) in attention:
            out[n] = f"{kind} inside nn.MultiheadAttention {attention[id(m)]!r}, which uses its weight without calling it"
        elif n in tied:
            out[n] = (f"{kind} whose weight is tied to {tied[n]}; the statistics would miss the other use, "
                      "so tied layers are not tracked")
        elif _kind(m) is not None:
            out[n] = f"{kind} not among the layers chosen"
        else:
            out[n] = (f"{kind} is not a supported layer (spurfast tracks nn.Linear, nn.Conv1d, nn.Conv2d and "
                      "subclasses that keep their forward)")
    return out


def _group_grad_layers(model: nn.Module, tracked: "OrderedDict[str, _Layer]", choice) -> set:
    """The names of the tracked layers that keep ``group_grad``, from ``track_group_grad``."""
    if isinstance(choice, bool):
        return set(tracked) if choice else set()
    if isinstance(choice, (str, nn.Module)):
        choice = [choice]
    try:
        items = list(choice)
    except TypeError:
        raise TypeError(f"track_group_grad must be a bool or a list of layer names/modules, got {choice!r}") from None
    name_of = {id(m): n for n, m in _named_modules(model).items()}
    chosen = set()
    for item in items:
        n = item if isinstance(item, str) else name_of.get(id(item)) if isinstance(item, nn.Module) else None
        if n not in tracked:
            raise ValueError(f"track_group_grad: {item!r} is not one of the tracked layers {list(tracked)}")
        chosen.add(n)
    return chosen


def _loss_scale(loss_scale) -> Tuple[float, bool]:
    """(the loss's scale factor, whether it came from a GradScaler) of ``record(loss_scale=)``."""
    if loss_scale is None:
        return 1.0, False
    if isinstance(loss_scale, tuple) and len(loss_scale) == 2 and _is_grad_scaler(loss_scale[0]):
        scaler, factor = loss_scale  # the loss times factor (1 / accumulation steps), then scaled
        factor, _ = _loss_scale(factor)
        scale, from_scaler = _loss_scale(scaler)
        return scale * factor, from_scaler
    if _is_grad_scaler(loss_scale):
        if not loss_scale.is_enabled():
            return 1.0, False
        return float(loss_scale.get_scale()), True
    if isinstance(loss_scale, torch.Tensor) and loss_scale.numel() == 1:
        loss_scale = float(loss_scale)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not 0 < loss_scale < float("inf"):
        raise ValueError(f"loss_scale must be a positive finite number, a GradScaler or a (GradScaler, number) "
                         f"pair, got {loss_scale!r}")
    return float(loss_scale), False


def _is_grad_scaler(obj) -> bool:  # torch.amp / torch.cuda.amp GradScaler
    return hasattr(obj, "get_scale") and hasattr(obj, "scale") and hasattr(obj, "is_enabled")


def _tokens_per_sample(x: torch.Tensor) -> int:
    """T of a Linear input ``[B, *, D]`` (1 for ``[B, D]`` and for an empty batch)."""
    return x[0].numel() // x.shape[-1] if x.shape[0] else 1


def _recorded_by(module: nn.Module) -> Optional[Tuple["NeuronStats", str]]:
    """(NeuronStats, layer name) whose open record() replaced ``module``'s forward, else None."""
    return getattr(vars(module).get("forward"), "_spurfast_recorded_by", None)


def _prepare_input(module: nn.Module, x: torch.Tensor):
    """Input and numeric (stride, padding, dilation, groups) of a conv call, explicit padding applied."""
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding: Tuple[int, ...] = (0,) * (module.weight.dim() - 2)
    else:
        x, padding = conv_padding(x, module.kernel_size, module.stride, module.padding, module.dilation)
    return x, (tuple(module.stride), padding, tuple(module.dilation), module.groups)


def _conv_per_sample_grad(module, x, grad_out, conv_args) -> torch.Tensor:
    stride, padding, dilation, groups = conv_args
    if isinstance(module, nn.Conv1d):
        x, grad_out = x.unsqueeze(2), grad_out.unsqueeze(2)
        kernel = (1,) + tuple(module.kernel_size)
        stride, padding, dilation = (1,) + stride, (0,) + padding, (1,) + dilation
    else:
        kernel = tuple(module.kernel_size)
    per_sample = conv2d_per_sample_grad(x, grad_out, kernel, stride, padding, dilation, groups)
    return per_sample.reshape((x.shape[0],) + _weight_shape(module))


def _plain_weight_grad(module, x, grad_out, conv_args) -> torch.Tensor:
    if conv_args is None:
        g, xx = as_tokens(grad_out, "grad_out"), as_tokens(x, "x")
        return g.flatten(0, 1).t().matmul(xx.flatten(0, 1).to(g.dtype))
    stride, padding, dilation, groups = conv_args
    shape = _weight_shape(module)  # convolution_backward reads only the weight's shape
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x.to(grad_out.dtype), grad_out.new_empty(shape), None, list(stride), list(padding), list(dilation),
        False, [0] * (len(shape) - 2), groups, [False, True, False],
    )
    return grad_w


def _weight_shape(module: nn.Module) -> Tuple[int, ...]:
    """A tracked layer's weight shape from its own attributes: under FSDP1 with
    ``use_orig_params=True`` ``module.weight`` is a flat shard outside the forward."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups) + tuple(module.kernel_size)
