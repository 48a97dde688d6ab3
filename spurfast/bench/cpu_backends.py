"""CPU: spurfast's `cpp` backend (C++/OpenMP kernels) against its `torch` backend (the
plain-torch reference, which materialises every per-sample gradient), and against a plain
forward+backward, on a ResNet-18-width conv stack and an MLP.

    python benchmarks/cpu_backends.py --out benchmarks/results/cpu_backends.json   # both models
    python benchmarks/cpu_backends.py --models resnet18_width --batch-size 64 --repeats 3
    python benchmarks/cpu_backends.py --render benchmarks/results/cpu_backends.json   # tables only

Three measurements per model (each model in a fresh process), each the median and IQR of
`--repeats` timed calls after `--warmup` untimed ones (fewer, not below 3, where the warm-up
round says they would overrun `--budget-s`); the variants of a measurement run in rotating
rounds so that load from other processes lands on all of them alike:

* ops: every tracked layer's `linear_grad_stats` / `conv_grad_stats` on that layer's input
  and output gradient (captured once with hooks), summed over layers; backends torch and
  cpp, and for convs the cpp `direct` and `gram` methods beside `auto`.
* step: `with NeuronStats(model, 4, backend=...).record(group_ids): loss.backward()`.
* plain: the same forward+backward without spurfast.

Errors are against the torch backend: `grad_sq` elementwise relative, `group_grad` max
abs error over max abs value. Peak RSS is the process's resident high-water mark above
its level before the call (Linux only; reset per call through /proc/self/clear_refs).
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf
from spurfast.bench import timing
from spurfast.bench.models import MLP, resnet18_width_stack
from spurfast.ops._common import choose_method, input_gram_shape  # to report what method="auto" picks

NUM_GROUPS = 4
NUM_CLASSES = 10


def mlp() -> nn.Module:
    """Flattened 3x32x32 -> 2048 -> 2048 -> 10 with ReLU."""
    return MLP((3072, 2048, 2048, NUM_CLASSES)).eval()


# name -> (factory, default batch size, conv model: time cpp direct/gram separately)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], int, bool]] = {
    "resnet18_width": (resnet18_width_stack, 32, True),
    "mlp": (mlp, 128, False),
}


# ---------------------------------------------------------------------------------- ops level
def capture_layer_io(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, dict]:
    """Input and output gradient of every Linear/Conv2d in one plain forward+backward."""
    records: Dict[str, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            def forward_hook(m, inputs, output, name=name):
                records[name] = {"module": m, "x": inputs[0].detach()}
                output.register_hook(lambda grad, name=name: records[name].__setitem__("grad_out", grad.detach()))

            hooks.append(module.register_forward_hook(forward_hook))
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return records


def layer_call(rec: dict, group_ids: torch.Tensor, backend: str, method: str):
    m, x, g = rec["module"], rec["x"], rec["grad_out"]
    if isinstance(m, nn.Linear):
        return sf.ops.linear_grad_stats(x, g, group_ids, NUM_GROUPS, backend=backend, method=method, check_inputs=False)
    return sf.ops.conv_grad_stats(
        x, g, m.weight.shape, m.stride, m.padding, m.dilation, m.groups, group_ids, NUM_GROUPS,
        backend=backend, method=method, check_inputs=False,
    )


def auto_method(rec: dict) -> str:
    """The method the cpp backend's method="auto" runs for this layer."""
    m, g = rec["module"], rec["grad_out"]
    if isinstance(m, nn.Linear):
        tokens = g.numel() // (g.shape[0] * g.shape[-1])
        return choose_method(tokens, m.out_features, m.in_features, "cpp")
    kh, kw = m.kernel_size
    return choose_method(g.shape[2] * g.shape[3], m.out_channels // m.groups, m.in_channels // m.groups * kh * kw, "cpp",
                         linear=False, input_gram=input_gram_shape(rec["x"], m.groups))


def describe(rec: dict) -> dict:
    m = rec["module"]
    out = {"type": type(m).__name__, "weight_shape": list(m.weight.shape),
           "x_shape": list(rec["x"].shape), "grad_out_shape": list(rec["grad_out"].shape)}
    if isinstance(m, nn.Conv2d):
        out.update(stride=list(m.stride), padding=list(m.padding))
    return out


def grad_sq_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Elementwise max |got - want| / want; entries below 1e-6 of the largest are compared
    against that floor instead (a channel ReLU silenced for a sample has grad_sq = 0)."""
    got, want = got.double(), want.double()
    floor = want.abs().max().clamp_min(1e-300) * 1e-6
    return ((got - want).abs() / want.abs().clamp_min(floor)).max().item()


def normwise_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def bench_ops(records: Dict[str, dict], group_ids: torch.Tensor, variants: List[Tuple[str, str]],
              repeats: int, warmup: int, memory: bool, budget_s: Optional[float]) -> dict:
    """Rounds over layers; at each layer every variant runs once, in an order rotated per
    layer and round, so that load from other processes hits the variants alike layer by layer.
    A variant's total for a round is the sum of its layer times in that round."""
    keys = [f"{b}/{m}" for b, m in variants]
    wall = {k: {n: [] for n in records} for k in keys}
    cpu = {k: {n: [] for n in records} for k in keys}
    peak = {k: 0 for k in keys}
    r = 0
    while r < warmup + repeats:
        timed = r >= warmup
        round_start = time.perf_counter()
        for i, (name, rec) in enumerate(records.items()):
            k0 = (r + i) % len(keys)
            for key in keys[k0:] + keys[:k0]:
                backend, method = key.split("/")
                wall_ms, cpu_ms, peak_bytes = timing.time_call(
                    lambda: layer_call(rec, group_ids, backend, method), memory and timed
                )
                if timed:
                    wall[key][name].append(wall_ms)
                    cpu[key][name].append(cpu_ms)
                    peak[key] = max(peak[key], peak_bytes or 0)
        if r == warmup - 1:
            repeats = timing.repeats_within(budget_s, time.perf_counter() - round_start, repeats)
        r += 1
    totals = {}
    for key in keys:
        per_round = [sum(wall[key][n][r] for n in records) for r in range(repeats)]
        cpu_round = [sum(cpu[key][n][r] for n in records) for r in range(repeats)]
        totals[key] = timing.summarize(per_round, cpu_round)
        totals[key]["peak_rss_delta_bytes"] = peak[key] if memory else None

    layers = {}
    for name, rec in records.items():
        want_sq, want_group = layer_call(rec, group_ids, "torch", "auto")
        entry = {**describe(rec), "auto_method": auto_method(rec), "variants": {}}
        for key in keys:
            backend, method = key.split("/")
            got_sq, got_group = layer_call(rec, group_ids, backend, method)
            row = timing.summarize(wall[key][name], cpu[key][name])
            row["max_rel_err_grad_sq"] = grad_sq_rel_err(got_sq, want_sq)
            row["max_rel_err_group_grad"] = normwise_err(got_group, want_group)
            entry["variants"][key] = row
        layers[name] = entry
    for key, total in totals.items():
        total["max_rel_err_grad_sq"] = max(l["variants"][key]["max_rel_err_grad_sq"] for l in layers.values())
        total["max_rel_err_group_grad"] = max(l["variants"][key]["max_rel_err_group_grad"] for l in layers.values())
    return {"total": totals, "layers": layers}


# --------------------------------------------------------------------------------- step level
def bench_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group_ids: torch.Tensor,
               repeats: int, warmup: int, memory: bool, budget_s: Optional[float]) -> dict:
    # Two NeuronStats on one model coexist: each only touches the model inside its record().
    stats = {backend: sf.NeuronStats(model, num_groups=NUM_GROUPS, backend=backend) for backend in ("torch", "cpp")}

    def plain() -> None:
        F.cross_entropy(model(x), y).backward()

    def scoring(backend: str) -> None:
        with stats[backend].record(group_ids):
            F.cross_entropy(model(x), y).backward()

    fns = {"plain": plain, "torch": lambda: scoring("torch"), "cpp": lambda: scoring("cpp")}
    result = timing.interleaved(fns, repeats, warmup, measure_memory=memory,
                                 between=lambda: model.zero_grad(set_to_none=True), budget_s=budget_s)

    # Honesty check on one fresh batch: cpp vs torch statistics, and both weight gradients vs plain.
    plain()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    weight_err = {}
    for backend, s in stats.items():
        s.reset()
        scoring(backend)
        weight_err[backend] = max(normwise_err(p.grad, plain_grads[n]) for n, p in model.named_parameters())
        model.zero_grad(set_to_none=True)
    names = stats["torch"].layer_names
    result["cpp"]["max_rel_err_grad_sq"] = max(
        grad_sq_rel_err(stats["cpp"].last_grad_sq[n], stats["torch"].last_grad_sq[n]) for n in names
    )
    result["cpp"]["max_rel_err_group_grad"] = max(
        normwise_err(stats["cpp"].group_grad[n], stats["torch"].group_grad[n]) for n in names
    )
    for backend in ("torch", "cpp"):
        result[backend]["max_rel_err_weight_grad_vs_plain"] = weight_err[backend]
        stats[backend].remove()
    return result


def bench_model(name: str, batch: int, repeats: int, warmup: int, memory: bool, budget_s: Optional[float]) -> dict:
    factory, _, is_conv = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    group_ids = torch.randint(0, NUM_GROUPS, (batch,))
    load_before = timing.load_average()
    start = time.perf_counter()

    records = capture_layer_io(model, x, y)
    variants = [("torch", "auto"), ("cpp", "auto")]
    if is_conv:
        variants += [("cpp", "direct"), ("cpp", "gram")]
    with timing.OtherLoad() as ops_load:
        ops = bench_ops(records, group_ids, variants, repeats, warmup, memory, budget_s)
    with timing.OtherLoad() as step_load:
        step = bench_step(model, x, y, group_ids, repeats, warmup, memory, budget_s)

    for rows in (ops["total"], step):
        for row in rows.values():
            row["samples_per_s"] = batch / row["median_ms"] * 1e3
    torch_ops = ops["total"]["torch/auto"]["median_ms"]
    for row in ops["total"].values():
        row["ratio_torch_over_this"] = torch_ops / row["median_ms"]
    for layer in ops["layers"].values():
        t = layer["variants"]["torch/auto"]["median_ms"]
        for row in layer["variants"].values():
            row["ratio_torch_over_this"] = t / row["median_ms"]
    for row in step.values():
        row["ratio_torch_over_this"] = step["torch"]["median_ms"] / row["median_ms"]
        row["ratio_to_plain"] = row["median_ms"] / step["plain"]["median_ms"]
    return {
        "batch_size": batch,
        "num_tracked_layers": len(records),
        "num_groups": NUM_GROUPS,
        "ops": ops,
        "step": step,
        "wall_s": time.perf_counter() - start,
        # cores (of os.cpu_count()) other processes kept busy meanwhile: 0 on a quiet machine
        "other_processes_busy_cores": {"ops": ops_load.cores, "step": step_load.cores},
        "load_average_before": load_before,
        "load_average_after": timing.load_average(),
    }


def bench_model_isolated(name: str, batch: int, repeats: int, warmup: int, memory: bool,
                         budget_s: Optional[float], threads: int) -> dict:
    """bench_model in a fresh process: the allocator's state left by one model (glibc keeps
    freed memory around, so later large tensors skip page faults) then moves neither the
    times nor the peak RSS of the next, and `--models mlp` reproduces the full run's row."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_bench_model_with_threads, (name, batch, repeats, warmup, memory, budget_s, threads))


def _bench_model_with_threads(name, batch, repeats, warmup, memory, budget_s, threads) -> dict:
    torch.set_num_threads(threads)
    return bench_model(name, batch, repeats, warmup, memory, budget_s)


# ------------------------------------------------------------------------------------ tables
def _mib(row: dict) -> str:
    b = row.get("peak_rss_delta_bytes")
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _err(row: dict) -> str:
    e = row.get("max_rel_err_grad_sq")
    return "ref" if e is None else f"{e:.1e}"


def render(data: dict) -> str:
    lines = [
        "| model (B) | level | backend / method | median ms | IQR ms | samples/s | torch / this | this / plain | peak RSS +MiB | grad_sq max rel err vs torch |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in data["models"].items():
        label = f"{name} ({r['batch_size']})"
        for key, row in r["ops"]["total"].items():
            err = "ref" if key.startswith("torch") else _err(row)
            lines.append(
                f"| {label} | ops (sum of {r['num_tracked_layers']} layers) | {key} | {row['median_ms']:,.1f} | {row['iqr_ms']:,.1f} "
                f"| {row['samples_per_s']:,.0f} | {row['ratio_torch_over_this']:.2f}x | | {_mib(row)} | {err} |"
            )
        for key in ("plain", "torch", "cpp"):
            row = r["step"][key]
            err = {"plain": "", "torch": "ref"}.get(key) or _err(row)
            lines.append(
                f"| {label} | step | {'plain fwd+bwd' if key == 'plain' else 'NeuronStats ' + key} "
                f"| {row['median_ms']:,.1f} | {row['iqr_ms']:,.1f} | {row['samples_per_s']:,.0f} "
                f"| {'' if key == 'plain' else format(row['ratio_torch_over_this'], '.2f') + 'x'} "
                f"| {row['ratio_to_plain']:.2f}x | {_mib(row)} | {err} |"
            )
    return "\n".join(lines)


def render_layers(data: dict) -> str:
    """Per-layer op times (median ms), with torch / this in brackets and what auto chose."""
    out = []
    for name, r in data["models"].items():
        keys = list(r["ops"]["total"])
        out.append(f"{name}, B={r['batch_size']}: per-layer op median ms (torch / this)\n")
        out.append("| layer | x | grad_out | auto picks | " + " | ".join(keys) + " |")
        out.append("|---|---|---|---|" + "--:|" * len(keys))
        for layer, e in r["ops"]["layers"].items():
            cells = []
            for k in keys:
                v = e["variants"][k]
                cells.append(f"{v['median_ms']:,.1f}" + ("" if k.startswith("torch") else f" ({v['ratio_torch_over_this']:.2f}x)"))
            x = "x".join(map(str, e["x_shape"][1:]))
            g = "x".join(map(str, e["grad_out_shape"][1:]))
            out.append(f"| {layer} {e['type']} | {x} | {g} | {e['auto_method']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- run
def default_batch_sizes(models: Sequence[str]) -> Dict[str, int]:
    return {m: MODELS[m][1] for m in models}


def measure(models: Sequence[str], batch_sizes: Dict[str, int], repeats: int = 5, warmup: int = 1,
            budget_s: Optional[float] = 45.0, threads: int = 2, memory: bool = True, in_process: bool = False,
            command: Optional[str] = None) -> dict:
    """Every model of ``models`` (each in a fresh process unless ``in_process``); the results
    file's content. Peak RSS is measured where Linux allows it and ``memory`` asks for it."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"--models must be a non-empty subset of {','.join(MODELS)}, got {list(models)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    torch.set_num_threads(threads)
    memory = memory and timing.peak_rss_supported()
    data = {
        "command": command,
        "machine": timing.machine_info(),
        "spurfast_build": sf.build_info(),
        "settings": {"repeats": repeats, "warmup": warmup, "budget_s": budget_s, "threads": threads,
                     "num_groups": NUM_GROUPS, "peak_rss_measured": memory, "process_per_model": not in_process},
        "models": {},
    }
    start = time.perf_counter()
    for name in models:
        run = (name, batch_sizes[name], repeats, warmup, memory, budget_s or None)
        data["models"][name] = bench_model(*run) if in_process else bench_model_isolated(*run, threads)
        r = data["models"][name]
        print(f"{name}: done in {r['wall_s']:.0f} s; other processes kept "
              f"{r['other_processes_busy_cores']} cores busy meanwhile", flush=True)
    data["wall_s"] = time.perf_counter() - start
    data["machine"]["load_average_at_end"] = timing.load_average()
    return data
