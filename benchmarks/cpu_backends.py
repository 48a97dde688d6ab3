"""CPU: spurfast's `cpp` backend (C++/OpenMP kernels) against its `torch` backend (the
plain-torch reference, which materialises per-sample gradients), and against a plain
forward+backward, on a ResNet-18-width conv stack and an MLP.

    python benchmarks/cpu_backends.py                     # writes benchmarks/results/cpu_backends.json
    python benchmarks/cpu_backends.py --models mlp --repeats 3

Two levels are timed: the ops alone (every tracked layer's `linear_grad_stats` /
`conv_grad_stats` on captured layer inputs and output gradients, summed over layers), and
the whole scoring step (`NeuronStats.record` around forward + backward, 4 groups). Each
figure is the median (and inter-quartile range) of `--repeats` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf

NUM_GROUPS = 4


def resnet18_width_stack() -> nn.Module:
    """CIFAR-style: 3->64 stem, then stages of two 3x3 convs at widths 64/128/256/512 (stride 2
    entering stages 2-4), BatchNorm (eval) and ReLU, global pool, Linear(512, 10)."""
    layers: List[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    width = 64
    for stage, out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers).eval()


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3072, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    ).eval()


MODELS = {"resnet18_width": (resnet18_width_stack, 32), "mlp": (mlp, 128)}


def timed(fn: Callable[[], object], repeats: int) -> Dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "runs_ms": times}


def capture_layer_io(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Inputs and output gradients of every Linear/Conv2d in one plain forward+backward."""
    records = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            def forward_hook(m, inputs, output, name=name):
                records[name] = {"module": m, "x": inputs[0].detach()}

            def backward_hook(m, grad_input, grad_output, name=name):
                records[name]["grad_out"] = grad_output[0].detach()

            hooks += [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return records


def op_call(record, group_ids, backend: str, method: str):
    m, x, g = record["module"], record["x"], record["grad_out"]
    if isinstance(m, nn.Linear):
        return sf.ops.linear_grad_stats(x, g, group_ids, NUM_GROUPS, backend=backend, method=method, check_inputs=False)
    return sf.ops.conv_grad_stats(
        x, g, m.weight.shape, m.stride, m.padding, m.dilation, m.groups, group_ids, NUM_GROUPS,
        backend=backend, method=method, check_inputs=False,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def bench_model(name: str, batch: int, repeats: int) -> dict:
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    for m in model.modules():  # only Linear/Conv weights train, as in the GPU benchmark
        for pname, p in m.named_parameters(recurse=False):
            p.requires_grad_(isinstance(m, (nn.Linear, nn.Conv2d)) and pname == "weight")
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    group_ids = torch.randint(0, NUM_GROUPS, (batch,))
    records = capture_layer_io(model, x, y)
    result: dict = {"batch_size": batch, "layers": {}, "ops": {}, "step": {}}

    variants = [("torch", "auto"), ("cpp", "auto")]
    if name == "resnet18_width":
        variants += [("cpp", "direct"), ("cpp", "gram")]
    for layer, rec in records.items():
        per_layer = {}
        want = op_call(rec, group_ids, "torch", "auto")
        for backend, method in variants:
            t = timed(lambda: op_call(rec, group_ids, backend, method), repeats)
            got = op_call(rec, group_ids, backend, method)
            per_layer[f"{backend}/{method}"] = {
                "median_ms": t["median_ms"], "max_rel_err_grad_sq": rel_err(got[0], want[0]),
                "max_rel_err_group_grad": rel_err(got[1], want[1]),
            }
        per_layer["shape"] = {"x": list(rec["x"].shape), "grad_out": list(rec["grad_out"].shape)}
        result["layers"][layer] = per_layer
    for backend, method in variants:
        key = f"{backend}/{method}"
        result["ops"][key] = {
            "median_ms": sum(v[key]["median_ms"] for v in result["layers"].values()),
            "max_rel_err_grad_sq": max(v[key]["max_rel_err_grad_sq"] for v in result["layers"].values()),
        }

    def plain_step():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    result["step"]["plain"] = timed(plain_step, repeats)
    last = {}
    for backend in ("torch", "cpp"):
        stats = sf.NeuronStats(model, num_groups=NUM_GROUPS, backend=backend)

        def scoring_step():
            with stats.record(group_ids):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        result["step"][backend] = timed(scoring_step, repeats)
        last[backend] = torch.cat([v.flatten() for v in stats.last_grad_sq.values()])
        stats.remove()
    result["step"]["cpp"]["max_rel_err_vs_torch"] = rel_err(last["cpp"], last["torch"])
    plain = result["step"]["plain"]["median_ms"]
    for backend in ("torch", "cpp"):
        step = result["step"][backend]
        step["samples_per_s"] = batch / step["median_ms"] * 1e3
        step["ratio_to_plain"] = step["median_ms"] / plain
    result["speedup_cpp_over_torch"] = {
        "ops": result["ops"]["torch/auto"]["median_ms"] / result["ops"]["cpp/auto"]["median_ms"],
        "step": result["step"]["torch"]["median_ms"] / result["step"]["cpp"]["median_ms"],
    }
    return result


def render(data: dict) -> str:
    lines = [
        "| model | B | ops: torch ms | ops: cpp ms | ops speed-up | step: plain ms | step: torch ms | step: cpp ms | step speed-up | cpp step / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["models"].items():
        lines.append(
            f"| {name} | {r['batch_size']} | {r['ops']['torch/auto']['median_ms']:.0f} | {r['ops']['cpp/auto']['median_ms']:.0f} "
            f"| {r['speedup_cpp_over_torch']['ops']:.1f}x | {r['step']['plain']['median_ms']:.0f} "
            f"| {r['step']['torch']['median_ms']:.0f} | {r['step']['cpp']['median_ms']:.0f} "
            f"| {r['speedup_cpp_over_torch']['step']:.1f}x | {r['step']['cpp']['ratio_to_plain']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/cpu_backends.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "spurfast_build": sf.build_info()["backends"],
        },
        "command": "python benchmarks/cpu_backends.py " + " ".join(argv or []),
        "models": {},
    }
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        data["models"][name] = bench_model(name, args.batch_size or MODELS[name][1], args.repeats)
        print(f"{name}: done", flush=True)
    table = render(data)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    return data


if __name__ == "__main__":
    main()
