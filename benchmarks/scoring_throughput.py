"""Throughput of a spurfast scoring pass against plain training and per-sample-gradient peers.

A *scoring pass* is one forward and backward of the batch loss inside
``NeuronStats.record`` (per-sample ``grad_sq``, ``group_grad`` and activation statistics
for every Linear/Conv layer, 4 groups). It is timed against

* ``plain``: the same forward + backward without spurfast (the cost to beat);
* ``opacus``: ``GradSampleModule`` per-sample gradients, then squared row norms;
* ``func``: ``torch.func.vmap(grad(...))`` over ``functional_call``, then squared row norms;
* ``backpack``: BackPACK ``BatchGrad`` per-sample gradients, then squared row norms
  (``extend(model)``; fails on torchvision ResNets, whose in-place ``+=``/ReLU modify
  outputs of hooked modules; the error is recorded);
* ``backpack_fx``: the same after ``extend(model, use_converter=True)``, BackPACK's
  torch.fx rewrite of the graph that makes residual networks work.

Every method sees the same model (a fresh copy of one initialisation), batch and labels.
Only Linear/Conv weights require grad (biases and norm parameters are frozen), the model
is in eval mode (BatchNorm uses running statistics, Dropout is off) and TF32 is allowed,
for all methods alike. Each method's per-sample, per-neuron squared norms
``||d l_n / d W[c]||^2`` (``l_n`` the sample's own loss term, so per-sample gradients of a
mean-reduced loss are multiplied by B) are compared with those of the first method that
produced them: max relative error = max |a - ref| / max |ref| over all layers concatenated.

Timing: per batch, median (and interquartile range) of CUDA-event timings after warm-up
on GPU, ``time.perf_counter`` on CPU. Peak memory: ``torch.cuda.max_memory_allocated``,
reset before each method (so it includes the model, optimizer-free, and the batch).

Usage::

    python benchmarks/scoring_throughput.py --device cuda --table
    python benchmarks/scoring_throughput.py --device cpu --models mlp --methods spurfast,plain,func --tiny
    python benchmarks/scoring_throughput.py --render benchmarks/results/scoring_nvidia-h100-80gb-hbm3.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("resnet18", "resnet50", "vit_small", "vit_base", "mlp")
ALL_METHODS = ("spurfast", "plain", "opacus", "func", "backpack", "backpack_fx")
NUM_GROUPS = 4
TRACKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Targets of the GPU issue for the spurfast scoring pass, relative to plain forward+backward.
TIME_TARGET, MEM_TARGET = 1.15, 1.2


# ---------------------------------------------------------------------------- models
class MLP(nn.Sequential):
    """Flattened image -> Linear/ReLU stack -> logits."""

    def __init__(self, widths: Sequence[int]):
        layers: List[nn.Module] = [nn.Flatten()]
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


def _import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise RuntimeError(
            f"this model needs {package} ({exc!r}); install it (see benchmarks/README_gpu.md)"
        ) from exc


def _torchvision_resnet(name: str, num_classes: int) -> nn.Module:
    torchvision = _import("torchvision", "torchvision")
    return getattr(torchvision.models, name)(num_classes=num_classes)


def _timm_vit(name: str, img_size: int) -> nn.Module:
    timm = _import("timm", "timm")
    return timm.create_model(name, pretrained=False, num_classes=2, img_size=img_size)


# name -> (builder(tiny), default batch, input shape (tiny -> shape), classes)
# The full-size entries are the issue's reference configurations; --tiny shrinks inputs
# and widths for CPU smoke tests only (the JSON records it).
MODEL_SPECS: Dict[str, dict] = {
    "resnet18": dict(
        build=lambda tiny: _torchvision_resnet("resnet18", 10),
        batch=256, shape=lambda tiny: (3, 32, 32), classes=10,
    ),
    "resnet50": dict(
        build=lambda tiny: _torchvision_resnet("resnet50", 2),
        batch=64, shape=lambda tiny: (3, 64, 64) if tiny else (3, 224, 224), classes=2,
    ),
    "vit_small": dict(
        build=lambda tiny: _timm_vit("vit_small_patch16_224", 32 if tiny else 224),
        batch=64, shape=lambda tiny: (3, 32, 32) if tiny else (3, 224, 224), classes=2,
    ),
    "vit_base": dict(
        build=lambda tiny: _timm_vit("vit_base_patch16_224", 32 if tiny else 224),
        batch=32, shape=lambda tiny: (3, 32, 32) if tiny else (3, 224, 224), classes=2,
    ),
    "mlp": dict(
        build=lambda tiny: MLP((64, 32, 32, 10) if tiny else (3072, 2048, 2048, 10)),
        batch=512, shape=lambda tiny: (1, 8, 8) if tiny else (3, 32, 32), classes=10,
    ),
}


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


# ---------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> List[float]:
    """Milliseconds per call of ``fn``: CUDA events on GPU, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms: Sequence[float]) -> Tuple[float, float]:
    """(median, interquartile range) in ms."""
    t = torch.tensor(list(times_ms), dtype=torch.float64)
    q25, q50, q75 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return q50, q75 - q25


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The checked-out commit, read from .git without running git (None when unavailable)."""
    try:
        git = Path(__file__).resolve().parents[1] / ".git"
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git / ref
            if ref_file.exists():
                return ref_file.read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    """Device and versions for the results file."""
    import spurfast

    try:
        build_info = spurfast.build_info()
    except Exception as exc:  # record, never abort a benchmark over metadata
        build_info = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "device": device_name(device),
        "device_type": device.type,
        "gpu_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "spurfast": getattr(spurfast, "__version__", None),
        "spurfast_commit": _git_commit(),
        "build_info": build_info,
        "peers": {d: _version(d) for d in ("opacus", "backpack-for-pytorch", "torchvision", "timm")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------- methods
# Each setup(model, x, y, group_ids, args) returns (step, check): step() runs one timed
# iteration (its per-sample norms included) and leaves no gradient state behind; check()
# runs one iteration and returns {layer name: grad_sq [B, C]} (None for plain).
def _row_sq_norms(per_sample_grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[B, C, ...] per-sample gradients -> [B, C] squared row norms, times scale**2."""
    grad_sq = per_sample_grad.flatten(2).float().square().sum(-1)
    return grad_sq * (scale * scale) if scale != 1.0 else grad_sq


def setup_plain(model, x, y, group_ids, args):
    def step():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def check():
        step()
        return None

    return step, check


def setup_spurfast(model, x, y, group_ids, args):
    import spurfast

    stats = spurfast.NeuronStats(model, num_groups=NUM_GROUPS, backend=args.spurfast_backend)
    expected = [n for n, _ in tracked_layers(model)]
    if stats.layer_names != expected:
        raise RuntimeError(f"spurfast tracks {stats.layer_names}, the benchmark expects {expected}")

    def step():
        with stats.record(group_ids):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def check():
        step()
        return dict(stats.last_grad_sq)

    return step, check


def setup_opacus(model, x, y, group_ids, args):
    try:
        from opacus import GradSampleModule
    except ImportError as exc:
        raise RuntimeError(f"opacus is not installed ({exc!r})") from exc
    layers = tracked_layers(model)
    # Opacus records activations only for modules in training mode; Linear/Conv compute
    # the same in either mode, so only they are switched (BatchNorm/Dropout stay in eval).
    for _, m in layers:
        m.train()
    # loss_reduction="mean": Opacus multiplies the backpropagated gradient by B, so
    # grad_sample[n] is already the gradient of l_n (checked against torch.func in the tests).
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")

    def run():
        F.cross_entropy(gsm(x), y).backward()
        grad_sq = {n: _row_sq_norms(m.weight.grad_sample) for n, m in layers}
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample
        return grad_sq

    return run, run


def setup_func(model, x, y, group_ids, args):
    from torch.func import functional_call, grad, vmap

    layers = tracked_layers(model)
    params = {f"{n}.weight": m.weight.detach() for n, m in layers}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(p, xn, yn):
        out = functional_call(model, (p, frozen), (xn.unsqueeze(0),))
        return F.cross_entropy(out, yn.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def run():
        grads = per_sample_grad(params, x, y)
        return {n: _row_sq_norms(grads[f"{n}.weight"]) for n, _ in layers}

    return run, run


def setup_backpack(model, x, y, group_ids, args, use_converter: bool = False):
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError as exc:
        raise RuntimeError(f"backpack-for-pytorch is not installed ({exc!r})") from exc
    layers = tracked_layers(model)
    # The converter returns a GraphModule that calls the same modules and parameters.
    model = extend(model, use_converter=use_converter)
    batch = x.shape[0]

    def run():
        loss = F.cross_entropy(model(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        # grad_batch holds the per-sample gradients of the *mean* loss, l_n / B.
        grad_sq = {n: _row_sq_norms(m.weight.grad_batch, scale=float(batch)) for n, m in layers}
        for _, m in layers:
            del m.weight.grad_batch
        model.zero_grad(set_to_none=True)
        return grad_sq

    return run, run


SETUPS = {
    "spurfast": setup_spurfast,
    "plain": setup_plain,
    "opacus": setup_opacus,
    "func": setup_func,
    "backpack": setup_backpack,
    "backpack_fx": lambda *a: setup_backpack(*a, use_converter=True),
}


# ---------------------------------------------------------------------------- running
def _error_string(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg if len(msg) <= 800 else msg[:800] + " ..."


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_rel_err(grad_sq: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    """max |a - ref| / max |ref| over all layers concatenated (float64)."""
    if list(grad_sq) != list(ref):
        raise ValueError(f"layers differ: {list(grad_sq)} vs {list(ref)}")
    for n in ref:
        if grad_sq[n].shape != ref[n].shape:
            raise ValueError(f"layer {n}: shape {list(grad_sq[n].shape)} vs reference {list(ref[n].shape)}")
    a = torch.cat([grad_sq[n].flatten() for n in ref])
    b = torch.cat([ref[n].flatten() for n in ref])
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / denom if denom > 0 else (a - b).abs().max().item()


def run_method(name, base_model, x, y, group_ids, device, args) -> Tuple[dict, Optional[dict]]:
    """Measure one method; returns (result row, grad_sq on CPU float64 or None)."""
    row = dict(time_ms_median=None, time_ms_iqr=None, samples_per_s=None, peak_mem_bytes=None,
               ratio_to_plain=None, mem_ratio_to_plain=None, max_rel_err=None, error=None)
    grad_sq = None
    model = step = check = None
    try:
        model = copy.deepcopy(base_model).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        step, check = SETUPS[name](model, x, y, group_ids, args)
        result = check()
        if result is not None:
            grad_sq = {n: t.detach().to("cpu", torch.float64) for n, t in result.items()}
        del result
        times = time_calls(step, args.warmup, args.repeats, device)
        median, iqr = summarize(times)
        row.update(time_ms_median=median, time_ms_iqr=iqr, samples_per_s=x.shape[0] / (median / 1e3))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
    except Exception as exc:  # OOM, unsupported layer, missing package: record and go on
        row["error"] = _error_string(exc)
        grad_sq = None
    finally:
        del model, step, check
        _free(device)
    return row, grad_sq


def make_batch(spec: dict, batch: int, tiny: bool, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(spec["shape"](tiny)), generator=gen)
    y = torch.randint(0, spec["classes"], (batch,), generator=gen)
    group_ids = torch.randint(0, NUM_GROUPS, (batch,), generator=gen)
    return x.to(device), y.to(device), group_ids.to(device)


def run_model(model_name: str, methods: Sequence[str], device: torch.device, args) -> dict:
    spec = MODEL_SPECS[model_name]
    batch = args.batch_size or spec["batch"]
    entry = dict(batch_size=batch, input_shape=list(spec["shape"](args.tiny)), num_classes=spec["classes"],
                 reference_method=None, error=None, methods={})
    try:
        torch.manual_seed(args.seed)
        base = prepare_model(spec["build"](args.tiny))
    except Exception as exc:
        entry["error"] = _error_string(exc)
        for m in methods:
            entry["methods"][m] = dict(error=f"model not built: {entry['error']}")
        return entry
    layers = tracked_layers(base)
    entry["num_tracked_layers"] = len(layers)
    entry["num_tracked_params"] = sum(m.weight.numel() for _, m in layers)
    x, y, group_ids = make_batch(spec, batch, args.tiny, device, args.seed)
    ref = None
    for method in methods:
        if args.verbose:
            print(f"[{model_name}] {method} ...", file=sys.stderr, flush=True)
        row, grad_sq = run_method(method, base, x, y, group_ids, device, args)
        if grad_sq is not None:
            if ref is None:
                ref, entry["reference_method"] = grad_sq, method
                row["max_rel_err"] = 0.0
            else:
                try:
                    row["max_rel_err"] = max_rel_err(grad_sq, ref)
                except ValueError as exc:
                    row["error"] = f"grad_sq comparison failed: {exc}"
        entry["methods"][method] = row
        if args.verbose:
            print(f"[{model_name}] {method}: {row}", file=sys.stderr, flush=True)
    plain = entry["methods"].get("plain")
    for row in entry["methods"].values():
        if plain and plain.get("time_ms_median") and row.get("time_ms_median"):
            row["ratio_to_plain"] = row["time_ms_median"] / plain["time_ms_median"]
        if plain and plain.get("peak_mem_bytes") and row.get("peak_mem_bytes"):
            row["mem_ratio_to_plain"] = row["peak_mem_bytes"] / plain["peak_mem_bytes"]
    return entry


# ---------------------------------------------------------------------------- table
def _fmt(v, spec: str, none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def render_table(data: dict) -> str:
    """Markdown table of one results file."""
    env = data.get("environment", {})
    s = data.get("settings", {})
    lines = [
        f"**{env.get('device', '?')}** · torch {env.get('torch')} · triton {env.get('triton')} · "
        f"CUDA {env.get('cuda')} · spurfast {env.get('spurfast')} ({(env.get('spurfast_commit') or '')[:10]}) · "
        f"{env.get('date', '')}",
        "",
        f"fp32 with TF32 {'on' if s.get('tf32') else 'off'}, {s.get('num_groups')} groups, "
        f"median of {s.get('repeats')} batches after {s.get('warmup')} warm-up"
        + (", **tiny shapes (smoke test, not a benchmark)**" if s.get("tiny") else ""),
        "",
        "| model | B | method | ms / batch | IQR ms | samples/s | peak MiB | time × plain | mem × plain | max rel err | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, entry in data.get("results", {}).items():
        for method, r in entry.get("methods", {}).items():
            note = r.get("error") or ""
            on_gpu = env.get("device_type") == "cuda"  # the targets are the GPU issue's
            if method == "spurfast" and on_gpu and r.get("ratio_to_plain") is not None and not note:
                ok_t = r["ratio_to_plain"] <= TIME_TARGET
                ok_m = r.get("mem_ratio_to_plain") is None or r["mem_ratio_to_plain"] <= MEM_TARGET
                note = f"target (≤{TIME_TARGET}x time, ≤{MEM_TARGET}x mem): {'met' if ok_t and ok_m else 'missed'}"
            note = note.replace("|", "\\|").replace("\n", " ")
            if len(note) > 120:
                note = note[:117] + "..."
            mem = r.get("peak_mem_bytes")
            lines.append(
                f"| {model} | {entry.get('batch_size')} | {method} | {_fmt(r.get('time_ms_median'), '.2f')} | "
                f"{_fmt(r.get('time_ms_iqr'), '.2f')} | {_fmt(r.get('samples_per_s'), ',.0f')} | "
                f"{_fmt(mem / 2**20 if mem else None, ',.0f')} | {_fmt(r.get('ratio_to_plain'), '.3f')} | "
                f"{_fmt(r.get('mem_ratio_to_plain'), '.3f')} | {_fmt(r.get('max_rel_err'), '.1e')} | {note} |"
            )
    return "\n".join(lines)


def render_only(path: Path, render: Callable[[dict], str]) -> dict:
    """``--render``: print the markdown table of an existing results file, measure nothing."""
    data = json.loads(path.read_text())
    print(render(data))
    return data


def select_device(args: argparse.Namespace) -> Tuple[torch.device, bool]:
    """``args.device`` checked for CUDA, with TF32 allowed for every method unless ``--no-tf32``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    tf32 = not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.device(args.device), tf32


def write_json(path: Path, data: dict) -> None:
    """Write atomically (``*.tmp`` then rename), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus the models of ``old`` it did not rerun; refuses to mix devices or settings."""
    for key in ("device", "torch"):
        if old["environment"].get(key) != new["environment"].get(key):
            raise SystemExit(f"--merge: {key} differs ({old['environment'].get(key)!r} in the file, "
                             f"{new['environment'].get(key)!r} now); write to another --out")
    for key in ("warmup", "repeats", "tf32", "tiny", "spurfast_backend", "batch_size_override"):
        if old["settings"].get(key) != new["settings"].get(key):
            raise SystemExit(f"--merge: setting {key} differs ({old['settings'].get(key)!r} in the file, "
                             f"{new['settings'].get(key)!r} now); write to another --out")
    results = {m: r for m, r in old["results"].items() if m not in new["results"]}
    results.update(new["results"])
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    merged = dict(new, results=dict(sorted(results.items(), key=lambda kv: order.get(kv[0], len(order)))))
    runs = old["settings"].get("runs") or [old["settings"].get("argv")]
    merged["settings"] = dict(new["settings"], models=list(merged["results"]), runs=runs + [new["settings"]["argv"]])
    return merged


# ---------------------------------------------------------------------------- CLI
def _csv(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return items


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS), type=lambda v: _csv(v, ALL_MODELS, "--models"))
    p.add_argument("--methods", default=",".join(ALL_METHODS), type=lambda v: _csv(v, ALL_METHODS, "--methods"),
                   help="the first one that yields grad_sq is the reference for max_rel_err")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/scoring_<device-name>.json)")
    p.add_argument("--table", action="store_true", help="print the markdown table when done")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' results already in --out (runs split over several calls)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only print the markdown table of an existing results file")
    p.add_argument("--tiny", action="store_true", help="shrink inputs and widths (CPU smoke tests only)")
    p.add_argument("--spurfast-backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    p.add_argument("--no-tf32", action="store_true", help="disallow TF32 (default: allowed for all methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be positive")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.render is not None:
        return render_only(args.render, render_table)
    device, tf32 = select_device(args)
    # Opacus and BackPACK hook modules whose inputs need no grad (the first layer); harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    env = environment(device)
    data = {
        "benchmark": "scoring_throughput",
        "environment": env,
        "settings": dict(models=args.models, methods=args.methods, batch_size_override=args.batch_size,
                         warmup=args.warmup, repeats=args.repeats, tf32=tf32, num_groups=NUM_GROUPS,
                         dtype="float32", tiny=args.tiny, spurfast_backend=args.spurfast_backend,
                         seed=args.seed, argv=list(sys.argv[1:] if argv is None else argv)),
        "results": {},
    }
    out = args.out or RESULTS_DIR / f"scoring_{slug(env['device'])}.json"
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    if old is not None:
        merge_results(old, data)  # refuse a mismatched file before spending time
    for model_name in args.models:
        data["results"][model_name] = run_model(model_name, args.methods, device, args)
        # Written after every model, so that a run cut off by a time limit keeps what it measured.
        write_json(out, merge_results(old, data) if old is not None else data)
    data = merge_results(old, data) if old is not None else data
    print(f"wrote {out}", file=sys.stderr)
    if args.table:
        print(render_table(data))
    return data


if __name__ == "__main__":
    main()
