"""Fused statistics kernels against the plain weight-gradient GEMM, per layer shape of the
scoring benchmark's models: cuBLAS/cuDNN TFLOP/s against ``linear_grad_stats`` /
``conv_grad_stats`` (methods auto/direct/gram, and the custom op directly). The
measurement is `spurfast.bench.gemm` (its docstring says what is timed and how).

Usage::

    python benchmarks/gemm_efficiency.py --device cuda --table
    python benchmarks/gemm_efficiency.py --device cpu --tiny --backend cpp
    python benchmarks/gemm_efficiency.py --render runs/gemm_efficiency-<time>/gemm_efficiency_<device>.json

Writes ``gemm_efficiency_<device-name>.json`` into a new ``runs/gemm_efficiency-<time>/``
unless ``--out FILE`` is given, rewritten after every shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from spurfast.bench import gemm
from spurfast.bench._flags import render_file
from spurfast.bench.environment import check_device, device_name, merge_into_existing, slug, write_json
from spurfast.report.runs import new_run_dir


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--backend", default="triton", choices=gemm.BACKENDS)
    p.add_argument("--methods", default=",".join(gemm.METHODS), help=f"subset of {','.join(gemm.METHODS)}")
    p.add_argument("--models", default=None,
                   help="only shapes of these models (resnet18,resnet50,vit_small,vit_base,mlp)")
    p.add_argument("--dtype", default="float32", choices=tuple(gemm.DTYPES))
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-gram-gib", type=float, default=8.0, help="skip method=gram above this workspace")
    p.add_argument("--no-kernel", action="store_true", help="skip timing the custom op directly")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--time-limit-s", type=float, default=None, help="skip the shapes that would start after this")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: gemm_efficiency_<device-name>.json "
                        "in a new runs/gemm_efficiency-<time>/)")
    p.add_argument("--table", action="store_true")
    p.add_argument("--merge", action="store_true",
                   help="keep the other shapes' results already in --out (runs split over several calls)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.settings = gemm.Settings(
            device=args.device, backend=args.backend, methods=[m for m in args.methods.split(",") if m],
            dtype=args.dtype, tf32=not args.no_tf32, warmup=args.warmup, repeats=args.repeats,
            max_gram_gib=args.max_gram_gib, no_kernel=args.no_kernel, tiny=args.tiny, seed=args.seed,
            time_limit_s=args.time_limit_s, verbose=args.verbose, argv=args.argv)
        args.shapes = gemm.select_shapes(args.tiny, [m for m in (args.models or "").split(",") if m])
        if args.render is None:
            check_device(args.device)
        if args.merge and args.out is None:
            raise ValueError("--merge needs --out FILE, the results file to add to")
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.render is not None:
        return render_file(args.render, gemm.render_table)
    name = device_name(torch.device(args.device))
    out = args.out or new_run_dir("gemm_efficiency") / f"gemm_efficiency_{slug(name)}.json"
    stub = {"environment": {"device": name, "torch": torch.__version__}, "settings": args.settings.record(), "results": []}
    merged = merge_into_existing(out, gemm.merge_results, stub, args.merge)
    data = merged(gemm.measure(args.settings, args.shapes, on_shape=lambda d: write_json(out, merged(d))))
    write_json(out, data)
    print(f"wrote {out}", file=sys.stderr)
    if args.table:
        print(gemm.render_table(data))
    return data


if __name__ == "__main__":
    main()
