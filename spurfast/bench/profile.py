"""Where a scoring step's time goes on CPU: per layer and per phase, from a torch.profiler trace.

A scoring step is the forward and backward of a model inside ``NeuronStats.record`` with every
statistic on. :class:`~spurfast.NeuronStats` opens a named profiler scope per layer around its
backward (``spurfast.backward:<layer>``) and its forward activation statistics
(``spurfast.activations:<layer>``); :func:`phase_times` walks the trace and assigns the *self*
time of every op under a scope to one phase, so a layer's phases add up to its scope:

* ``input grad`` -- the layer's ordinary input (and bias) gradient;
* ``GEMMs`` -- the products inside the fused op: per-sample products, Gram matrices, and the
  per-group weight gradients of the Gram path (``bmm``/``mm``/``addmm_``/``convolution_backward``);
* ``im2col`` -- the patch matrix of a convolution;
* ``fused reduction`` -- the fused op's own loops: squares and group sums of the products
  (and the elementwise squares of the rank-one path, one token per sample);
* ``copies and casts``, ``allocation`` (``empty``/``zeros``/``fill_``), ``input checks``
  (``min``/``max``/``item`` of the group ids) -- inside the fused op;
* ``removal effect`` -- the ablation statistic; ``dW`` -- the weight gradient summed from the
  group sums; ``deferred group sums`` -- copying the batch's rows into the deferred workspace,
  and the per-group GEMMs of a flush when it fills (``spurfast.group_sums``; a flush run when
  the sums are read falls outside every layer); ``activation statistics`` -- the forward scope;
  ``other`` -- the rest.

:func:`profile_model` also times plain and scoring steps back to back outside the profiler
(their ratio), the plain weight-gradient product of every layer alone (what the fused op
replaces), the minor page faults per step of each (first-touch allocation) and the time
spent folding the batch's statistics into the running ones (``spurfast.fold``).
Used by ``benchmarks/scoring_profile.py``.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf

__all__ = ["PHASES", "phase_times", "profile_model", "render"]

PHASES = ("input grad", "GEMMs", "im2col", "fused reduction", "copies and casts", "allocation",
          "input checks", "removal effect", "dW", "deferred group sums", "activation statistics", "other")
_FUSED_OPS = ("spurfast::linear_grad_stats", "spurfast::conv2d_grad_stats")
_COPIES = ("aten::to", "aten::_to_copy", "aten::contiguous", "aten::copy_", "aten::clone", "aten::index_select",
           "aten::reshape", "aten::view", "aten::transpose", "aten::narrow", "aten::slice", "aten::as_strided",
           "aten::t", "aten::permute", "aten::expand")
_ALLOCATION = ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::empty_strided", "aten::empty_like")
_CHECKS = ("aten::min", "aten::max", "aten::item", "aten::aminmax", "aten::_local_scalar_dense", "aten::bincount")
_GEMMS = ("aten::bmm", "aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::baddbmm", "aten::baddbmm_", "aten::mm_out",
          "aten::convolution_backward", "aten::mkldnn_convolution_backward_weights")


def _phase(name: str, fused: bool, top: bool) -> str:
    """The phase of an op's self time; ``fused``: inside a fused statistics op; ``top``: the
    op is the fused op itself."""
    if top:
        return "fused reduction"
    if fused:
        if name == "aten::im2col":
            return "im2col"
        if name in _GEMMS or name.startswith("aten::convolution_backward") or name.startswith("aten::mkldnn"):
            return "GEMMs"
        if name in _ALLOCATION:
            return "allocation"
        if name in _CHECKS:
            return "input checks"
        if name in ("aten::mul", "aten::square", "aten::sum", "aten::pow"):  # rank-one squares of T = 1
            return "fused reduction"
        if name in _COPIES:
            return "copies and casts"
        return "other"
    return "input grad" if name.startswith("aten::") else "other"  # dW is refined by the caller


def _walk(event, into: Dict[str, float], fused: bool, removal: bool) -> None:
    name = event.name
    top = name in _FUSED_OPS
    removal = removal or name == "spurfast::ablation_stats"
    if removal:
        phase = "removal effect"
    else:
        phase = _phase(name, fused, top)
    into[phase] = into.get(phase, 0.0) + event.self_cpu_time_total / 1e3
    for child in event.cpu_children:
        _walk(child, into, fused or top, removal)


def phase_times(events, steps: int = 1) -> Dict[str, Dict[str, float]]:
    """``{layer: {phase: ms per step}}`` from a profiler's ``events()`` over ``steps`` steps.

    In a layer's backward scope the ops outside the fused op, the removal effect and the
    ``sum`` after the fused op (dW) are the input (and bias) gradient. Example::

        >>> import torch.nn as nn, torch.nn.functional as F
        >>> from torch.profiler import profile, ProfilerActivity
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> stats = sf.NeuronStats(model, num_groups=2, backend="torch")
        >>> x, y, g = torch.randn(6, 8), torch.randint(0, 3, (6,)), torch.arange(6) % 2
        >>> with profile(activities=[ProfilerActivity.CPU]) as prof:
        ...     with stats.record(g):
        ...         F.cross_entropy(model(x), y).backward()
        >>> sorted(phase_times(prof.events()))
        ['0', '2']
    """
    out: Dict[str, Dict[str, float]] = {}
    for event in events:
        for prefix, fixed in (("spurfast.backward:", None), ("spurfast.activations:", "activation statistics")):
            if not event.name.startswith(prefix):
                continue
            layer = event.name[len(prefix):]
            phases = out.setdefault(layer, {})
            if fixed is not None:
                phases[fixed] = phases.get(fixed, 0.0) + event.cpu_time_total / 1e3
                continue
            phases["other"] = phases.get("other", 0.0) + event.self_cpu_time_total / 1e3
            after_fused = False
            for child in event.cpu_children:
                scratch: Dict[str, float] = {}
                _walk(child, scratch, False, False)
                if child.name == "aten::sum" and after_fused:  # group_grad.sum(0), not the bias grad
                    scratch = {"dW": sum(scratch.values())}
                elif child.name == "spurfast.group_sums":
                    scratch = {"deferred group sums": sum(scratch.values())}
                after_fused = after_fused or child.name in _FUSED_OPS
                for k, v in scratch.items():
                    phases[k] = phases.get(k, 0.0) + v
    return {layer: {k: v / steps for k, v in phases.items()} for layer, phases in out.items()}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _plain_weight_grad(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The layer's weight gradient alone, as plain autograd computes it."""
    if isinstance(module, nn.Linear):
        return grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return torch.ops.aten.convolution_backward(
        grad_out, x, module.weight, None, list(module.stride), list(module.padding), list(module.dilation),
        False, [0, 0], module.groups, [False, True, False])[1]


def profile_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_groups: int = 4, backend: str = "cpp",
                  pairs: int = 10, profiled_steps: int = 3, warmup: int = 2) -> Dict[str, object]:
    """The profile of one model's scoring step; see the module docstring for the fields.

    ``pairs`` alternating plain/scoring steps give ``ratio`` (median of the per-pair ratios);
    ``profiled_steps`` run under the profiler give ``layers`` (phases, ms per step); every
    Linear/Conv's weight gradient is also timed alone (``plain_dW_ms``).
    """
    from spurfast.bench.cpu_backends import capture_layer_io

    group_ids = torch.arange(x.shape[0]) % num_groups
    stats = sf.NeuronStats(model, num_groups=num_groups, backend=backend)

    def plain() -> None:
        F.cross_entropy(model(x), y).backward()

    def scoring() -> None:
        with stats.record(group_ids):
            F.cross_entropy(model(x), y).backward()

    def timed(fn: Callable[[], None]):
        model.zero_grad(set_to_none=True)
        faults, t0 = _faults(), time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, _faults() - faults

    try:
        for _ in range(warmup):
            timed(plain), timed(scoring)
        plain_ms, scoring_ms, plain_faults, scoring_faults = [], [], [], []
        for _ in range(pairs):
            ms, faults = timed(plain)
            plain_ms.append(ms), plain_faults.append(faults)
            ms, faults = timed(scoring)
            scoring_ms.append(ms), scoring_faults.append(faults)
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(profiled_steps):
                scoring()
                model.zero_grad(set_to_none=True)
        layers = phase_times(prof.events(), profiled_steps)
        profiled_total = sum(e.self_cpu_time_total for e in prof.events()) / 1e3 / profiled_steps
        fold_ms = sum(e.cpu_time_total for e in prof.events() if e.name == "spurfast.fold") / 1e3 / profiled_steps
    finally:
        stats.remove()
        model.zero_grad(set_to_none=True)
    records = capture_layer_io(model, x, y)
    plain_dw = {}
    for name, rec in records.items():
        times = []
        for _ in range(max(3, pairs // 2)):
            t0 = time.perf_counter()
            _plain_weight_grad(rec["module"], rec["x"], rec["grad_out"])
            times.append((time.perf_counter() - t0) * 1e3)
        plain_dw[name] = statistics.median(times)
    ratios = [s / p for s, p in zip(scoring_ms, plain_ms)]
    in_scopes = sum(sum(p.values()) for p in layers.values())
    return {
        "batch": int(x.shape[0]),
        "plain_ms": statistics.median(plain_ms),
        "scoring_ms": statistics.median(scoring_ms),
        "ratio": statistics.median(ratios),
        "ratio_iqr": _iqr(ratios),
        "plain_minor_faults": statistics.median(plain_faults),
        "scoring_minor_faults": statistics.median(scoring_faults),
        "profiled_step_ms": profiled_total,
        "in_layer_scopes_ms": in_scopes,
        "fold_ms": fold_ms,
        "layers": {name: {"phases_ms": layers.get(name, {}), "plain_dW_ms": plain_dw.get(name),
                          "weight_shape": list(rec["module"].weight.shape)}
                   for name, rec in records.items()},
    }


def _iqr(values: Sequence[float]) -> List[float]:
    if len(values) < 4:
        return [min(values), max(values)]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def render(data: Dict[str, object], top: Optional[int] = 8) -> str:
    """Markdown: per model, the step ratio and the ``top`` costliest layers' phases (ms per step)."""
    lines = []
    for model, row in data["models"].items():
        lines += [f"**{model}**, batch {row['batch']}: plain {row['plain_ms']:.1f} ms, scoring {row['scoring_ms']:.1f} ms, "
                  f"{row['ratio']:.2f}x [IQR {row['ratio_iqr'][0]:.2f}-{row['ratio_iqr'][1]:.2f}]; minor page faults "
                  f"per step {row['plain_minor_faults']:.0f} plain, {row['scoring_minor_faults']:.0f} scoring; under the "
                  f"profiler {row['profiled_step_ms']:.1f} ms per step: {row['in_layer_scopes_ms']:.1f} ms in the "
                  f"layers' statistics scopes, {row['fold_ms']:.1f} ms folding the batch into the running "
                  "statistics, the rest in the forward, the loss and autograd.", ""]
        layers = sorted(row["layers"].items(), key=lambda kv: -sum(kv[1]["phases_ms"].values()))
        lines += ["| layer | weight | plain dW ms | scope ms | " + " | ".join(PHASES) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(PHASES)]
        for name, layer in layers[:top]:
            phases = layer["phases_ms"]
            lines.append(f"| {name} | {'x'.join(map(str, layer['weight_shape']))} | {layer['plain_dW_ms']:.2f} | "
                         f"{sum(phases.values()):.2f} | " + " | ".join(f"{phases.get(p, 0.0):.2f}" for p in PHASES) + " |")
        lines.append("")
    return "\n".join(lines).strip()
