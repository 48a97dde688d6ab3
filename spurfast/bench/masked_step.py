"""Masked AdamW step on a ResNet-50-sized parameter set: spurfast's fused kernel against
``torch.optim.AdamW`` followed by restoring the masked rows, and against a ``copy_`` of the
same bytes.

    python benchmarks/masked_step.py                      # CPU, 2 threads, fractions 0, 1 %, 50 %
    python benchmarks/masked_step.py --device cuda        # triton (and cuda, if compiled) vs fused=True
    python benchmarks/masked_step.py --quick --out /tmp/m # small shapes, seconds

Parameters: ResNet-50's 161 tensors in their shapes (25,557,032 float32 values; built from the
architecture, no torchvision needed); ``--quick`` divides every width by 8. For each masked
fraction f, a seeded random round(f * C) rows of every tensor are frozen (for 1-D tensors:
elements). Per configuration, medians of ``--repeats`` timed steps after ``--warmup``:

* ``spurfast``: ``MaskedAdamW(..., backend=...)`` with ``freeze(rows)``, one ``step()``
  (its Python overhead included);
* ``torch``: ``torch.optim.AdamW(foreach=True)`` on CPU, ``fused=True`` on CUDA, with the
  masked rows of the parameter, ``exp_avg`` and ``exp_avg_sq`` cloned before the step and
  copied back after it (what keeping them unchanged costs with torch; its scalar step count
  cannot be kept per row, so released rows would get the wrong bias correction anyway);
* ``copy``: ``dst.copy_(src)`` moving the same number of bytes as the masked step must move:
  the active rows' parameter, gradient, ``exp_avg`` and ``exp_avg_sq`` read and parameter,
  ``exp_avg``, ``exp_avg_sq`` written (28 bytes per float32 element; a copy of n elements moves
  8n). ``copy_fraction = copy_ms / spurfast_ms`` is the share of that measured bandwidth the
  step reaches.

On CPU the three run in rotating rounds (load from other processes hits them alike); on CUDA
they are timed with events. Each configuration also checks, on fresh tensors over 3 steps,
that spurfast's result matches torch + restore (``max_rel_err_vs_torch``) and that the masked
rows and their state are bit-identical (``masked_rows_unchanged``).
Targets (from the issue): CPU: speedup >= 1 without a mask and > 1 with one, copy_fraction
>= 0.6; GPU: copy_fraction >= 0.8 against ``fused=True``.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from spurfast.bench import timing
from spurfast.bench.environment import environment
from spurfast.optim import MaskedAdamW

FRACTIONS = (0.0, 0.01, 0.5)
RESNET50_PARAMS = 25_557_032
BYTES_PER_ELEMENT_READ_WRITE = 7  # read p, g, m, v; write p, m, v
TARGETS = {"cpu": {"speedup_no_mask": 1.0, "copy_fraction": 0.6}, "cuda": {"copy_fraction": 0.8}}
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def resnet50_shapes(width_divisor: int = 1) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(name, shape)`` of torchvision's ``resnet50()`` parameters in ``named_parameters()``
    order (conv weights, BatchNorm weight and bias, fc), widths divided by ``width_divisor``.

    Example::

        >>> shapes = resnet50_shapes()
        >>> len(shapes), sum(math.prod(s) for _, s in shapes)
        (161, 25557032)
    """
    if not isinstance(width_divisor, int) or width_divisor < 1:
        raise ValueError(f"width_divisor must be a positive int, got {width_divisor!r}")
    w = lambda c: max(1, c // width_divisor)
    shapes: List[Tuple[str, Tuple[int, ...]]] = []

    def conv_bn(prefix: str, bn: str, out_ch: int, in_ch: int, k: int) -> None:
        shapes.append((f"{prefix}.weight", (out_ch, in_ch, k, k)))
        shapes.append((f"{bn}.weight", (out_ch,)))
        shapes.append((f"{bn}.bias", (out_ch,)))

    conv_bn("conv1", "bn1", w(64), 3, 7)
    in_ch = w(64)
    for layer, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", w(width), in_ch, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", w(width), w(width), 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", w(width) * 4, w(width), 1)
            if b == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", w(width) * 4, in_ch, 1)
            in_ch = w(width) * 4
    shapes.append(("fc.weight", (1000 // width_divisor, in_ch)))
    shapes.append(("fc.bias", (1000 // width_divisor,)))
    return shapes


def masked_rows(shapes: Sequence[Tuple[str, Tuple[int, ...]]], fraction: float, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{name: bool [C]}``: a seeded random round(fraction * C) rows of every tensor (True = masked)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes:
        rows = shape[0]
        chosen = torch.randperm(rows, generator=gen)[: round(fraction * rows)]
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[chosen] = True
        out[name] = mask
    return out


def _tensors(shapes, device, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for _, s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-2
    return params


class _TorchWithRestore:
    """torch.optim.AdamW, then the masked rows of param / exp_avg / exp_avg_sq put back."""

    def __init__(self, params, masks: Sequence[Optional[torch.Tensor]], device: torch.device):
        kind = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
        self.opt = torch.optim.AdamW(params, **HYPER, **kind)
        self.params = params
        self.rows = [None if m is None or not bool(m.any()) else m.nonzero().flatten().to(device) for m in masks]
        for p in params:  # torch's own initial state, created here so that the first step can restore it too
            self.opt.state[p].update(
                step=torch.zeros((), dtype=torch.float32, device=device if device.type == "cuda" else "cpu"),
                exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))

    def step(self) -> None:
        saved = []
        for p, idx in zip(self.params, self.rows):
            if idx is not None:
                state = self.opt.state[p]
                saved.append((p, idx, [t.index_select(0, idx) for t in (p.data, state["exp_avg"], state["exp_avg_sq"])]))
        self.opt.step()
        for p, idx, (sp, sm, sv) in saved:
            state = self.opt.state[p]
            p.data.index_copy_(0, idx, sp)
            state["exp_avg"].index_copy_(0, idx, sm)
            state["exp_avg_sq"].index_copy_(0, idx, sv)


def _spurfast(params, names, masks: Dict[str, torch.Tensor], backend: str) -> MaskedAdamW:
    opt = MaskedAdamW(list(zip(names, params)), **HYPER, backend=backend)
    if any(bool(m.any()) for m in masks.values()):
        opt.freeze(masks)
    return opt


def check(shapes, masks: Dict[str, torch.Tensor], backend: str, device: torch.device, steps: int = 3) -> dict:
    """spurfast vs torch + restore on fresh tensors: max relative error, masked rows unchanged."""
    names = [n for n, _ in shapes]
    ours = _tensors(shapes, device, seed=1)
    theirs = _tensors(shapes, device, seed=1)
    start = [p.detach().clone() for p in ours]
    opt = _spurfast(ours, names, masks, backend)
    ref = _TorchWithRestore(theirs, [masks[n] for n in names], device)
    for _ in range(steps):
        opt.step()
        ref.step()
    err, unchanged = 0.0, True
    for p, q, s, m in zip(ours, theirs, start, masks.values()):
        m = m.to(device)
        scale = q.detach().abs().max().item()
        err = max(err, (p.detach() - q.detach()).abs().max().item() / max(scale, 1e-30))
        state = opt.state[p]
        unchanged = unchanged and torch.equal(p.detach()[m], s[m]) and bool((state["exp_avg"][m] == 0).all()) \
            and bool((state["step"][m] == 0).all())
    return {"max_rel_err_vs_torch": err, "masked_rows_unchanged": bool(unchanged)}


def _time(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int) -> Dict[str, dict]:
    if device.type == "cpu":
        return timing.interleaved(fns, repeats, warmup)
    return {name: timing.summarize(timing.time_calls(fn, warmup, repeats, device)) for name, fn in fns.items()}


def measure_fraction(shapes, fraction: float, backend: str, device: torch.device, repeats: int, warmup: int,
                     seed: int = 0) -> dict:
    """One row of the table: the three timings, bandwidths and the check for one masked fraction."""
    names = [n for n, _ in shapes]
    masks = masked_rows(shapes, fraction, seed)
    ours = _tensors(shapes, device, seed=2)
    theirs = _tensors(shapes, device, seed=2)
    opt = _spurfast(ours, names, masks, backend)
    ref = _TorchWithRestore(theirs, [masks[n] for n in names], device)
    active_elements = sum(math.prod(s) // max(1, s[0]) * int((~masks[n]).sum()) if s else 1
                          for n, s in shapes)
    element_size = 4
    bytes_moved = active_elements * element_size * BYTES_PER_ELEMENT_READ_WRITE
    copy_elements = max(1, bytes_moved // (2 * element_size))
    src = torch.randn(copy_elements, device=device)
    dst = torch.empty_like(src)
    times = _time({"spurfast": opt.step, "torch": ref.step, "copy": lambda: dst.copy_(src)}, device, repeats, warmup)
    del ours, theirs, opt, ref  # free the memory before the check allocates its own tensors
    row = {
        "masked_fraction": fraction,
        "masked_param_fraction": 1 - active_elements / sum(math.prod(s) for _, s in shapes),
        "backend": backend,
        "spurfast_ms": times["spurfast"]["median_ms"],
        "torch_ms": times["torch"]["median_ms"],
        "copy_ms": times["copy"]["median_ms"],
        "bytes_moved": bytes_moved,
        "timings": times,
    }
    row["spurfast_GBps"] = bytes_moved / row["spurfast_ms"] / 1e6
    row["copy_GBps"] = bytes_moved / row["copy_ms"] / 1e6
    row["copy_fraction"] = row["copy_ms"] / row["spurfast_ms"]
    row["speedup_vs_torch"] = row["torch_ms"] / row["spurfast_ms"]
    row.update(check(shapes, masks, backend, device))
    targets = TARGETS[device.type]
    row["meets_copy_target"] = row["copy_fraction"] >= targets["copy_fraction"]
    if device.type == "cpu":
        row["meets_torch_target"] = (row["speedup_vs_torch"] >= 1.0) if fraction == 0 else (row["speedup_vs_torch"] > 1)
    return row


def default_backends(device: torch.device) -> List[str]:
    """``cpp`` on CPU (``torch`` where the extension is unavailable); ``triton`` and, if compiled, ``cuda`` on CUDA."""
    from spurfast._extension import load_extension

    ext = load_extension()
    if device.type == "cpu":
        return ["cpp"] if ext is not None else ["torch"]
    return ["triton"] + (["cuda"] if ext is not None and ext.with_cuda() else [])


def measure(device: torch.device, *, quick: bool = False, fractions: Sequence[float] = FRACTIONS,
            backends: Optional[Sequence[str]] = None, repeats: int = 15, warmup: int = 3, threads: int = 2,
            command: Optional[str] = None) -> dict:
    """Every (fraction, backend) row; the results file's content."""
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"fractions must lie in [0, 1), got {f}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    torch.set_num_threads(threads)  # the C++ kernel's OpenMP shares torch's runtime (one libgomp)
    shapes = resnet50_shapes(8 if quick else 1)
    backends = list(backends or default_backends(device))
    start = time.perf_counter()
    rows = []
    with timing.OtherLoad() as load:
        for fraction in fractions:
            for backend in backends:
                rows.append(measure_fraction(shapes, fraction, backend, device, repeats, warmup))
                r = rows[-1]
                print(f"masked {fraction:.0%} {backend}: {r['spurfast_ms']:.2f} ms (torch {r['torch_ms']:.2f}, "
                      f"copy {r['copy_ms']:.2f}); {r['copy_fraction']:.0%} of copy bandwidth", flush=True)
    return {
        "command": command,
        "environment": environment(device),
        "machine": timing.machine_info(),
        "settings": {"quick": quick, "fractions": list(fractions), "backends": backends, "repeats": repeats,
                     "warmup": warmup, "threads": threads, "hyperparameters": dict(HYPER, betas=list(HYPER["betas"])),
                     "parameters": sum(math.prod(s) for _, s in shapes), "tensors": len(shapes),
                     "torch_baseline": "AdamW(fused=True)" if device.type == "cuda" else "AdamW(foreach=True)",
                     "bytes_counted": "active rows: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, "
                                      "exp_avg_sq (28 B per float32 element); copy_ moves 8 B per element"},
        "targets": TARGETS[device.type],
        "other_processes_busy_cores": load.cores,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }


def render(data: dict) -> str:
    """The markdown table of a results file."""
    env = data.get("environment", {})
    lines = [
        f"Masked AdamW step, {data['settings']['parameters'] / 1e6:.2f}M float32 parameters in "
        f"{data['settings']['tensors']} tensors (ResNet-50 shapes{', widths / 8' if data['settings']['quick'] else ''}), "
        f"{env.get('device', '?')}, {data['settings']['threads']} thread{'s' if data['settings']['threads'] != 1 else ''}; torch = "
        f"{data['settings']['torch_baseline']} + restoring the masked rows.",
        "",
        "| masked rows | backend | spurfast ms | torch ms | speedup | copy_ ms | spurfast GB/s | copy GB/s "
        "| of copy bandwidth | max rel err vs torch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['masked_fraction']:.0%} | {r['backend']} | {r['spurfast_ms']:.2f} | {r['torch_ms']:.2f} | "
            f"{r['speedup_vs_torch']:.2f}x | {r['copy_ms']:.2f} | {r['spurfast_GBps']:.1f} | {r['copy_GBps']:.1f} | "
            f"{r['copy_fraction']:.0%} | {r['max_rel_err_vs_torch']:.1e} |")
    return "\n".join(lines)
