"""Throughput of a spurfast scoring pass against plain training and per-sample-gradient peers
(Opacus, torch.func, BackPACK), per model: ms/batch, samples/s, peak memory, ratios to
plain, max relative error of the per-sample norms. The measurement is
`spurfast.bench.throughput` (its docstring says what is timed and how); `spurfast bench`
runs the same with per-device defaults and writes a run folder.

Usage::

    python benchmarks/scoring_throughput.py --device cuda --table
    python benchmarks/scoring_throughput.py --device cpu --models mlp --methods spurfast,plain,func --tiny
    python benchmarks/scoring_throughput.py --render runs/scoring_throughput-<time>/scoring_<device>.json

Writes ``scoring_<device-name>.json`` into a new ``runs/scoring_throughput-<time>/``
unless ``--out FILE`` is given, rewritten after every model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from spurfast.bench import throughput
from spurfast.bench._flags import parse_batch_sizes, parse_list, render_file
from spurfast.bench.environment import check_device, device_name, merge_into_existing, slug, write_json
from spurfast.bench.models import ALL_MODELS
from spurfast.bench.peers import ALL_METHODS
from spurfast.report.runs import new_run_dir


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="the first one that yields grad_sq is the reference for max_rel_err")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--batch-size", default=None,
                   help="one int for every model, or name=int pairs (default: the GPU issue's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=None,
                   help="per method: cut --repeats (not below 3) so the timed calls take about this long")
    p.add_argument("--time-limit-s", type=float, default=None, help="skip what would start this long after the start")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: scoring_<device-name>.json in a new runs/scoring_throughput-<time>/)")
    p.add_argument("--table", action="store_true", help="print the markdown table when done")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' results already in --out (runs split over several calls)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only print the markdown table of an existing results file")
    p.add_argument("--tiny", action="store_true", help="shrink inputs and widths (CPU smoke tests only)")
    p.add_argument("--spurfast-backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    p.add_argument("--no-tf32", action="store_true", help="disallow TF32 (default: allowed for all methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=None,
                   help="CPU: rounds of plain and spurfast steps in alternation for per-round ratios "
                        "(default 20 on cpu, 0 on cuda)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory pass after the timings")
    p.add_argument("--verbose", "-v", action="store_true", help="print every result row to stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        models = parse_list(args.models, ALL_MODELS, "--models")
        args.settings = throughput.Settings(
            models=models, methods=parse_list(args.methods, ALL_METHODS, "--methods"), device=args.device,
            batch_sizes=parse_batch_sizes(args.batch_size, models), warmup=args.warmup, repeats=args.repeats,
            tiny=args.tiny, spurfast_backend=args.spurfast_backend, tf32=not args.no_tf32, seed=args.seed,
            budget_s=args.budget_s, time_limit_s=args.time_limit_s, allow_standin=args.device == "cpu",
            verbose=args.verbose, batch_size_override=args.batch_size, argv=args.argv,
            pairs=(20 if args.device == "cpu" and not args.tiny else 0) if args.pairs is None else args.pairs,
            memory=not args.no_memory)
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
        return render_file(args.render, throughput.render_table)
    settings = args.settings
    name = device_name(torch.device(settings.device))
    out = args.out or new_run_dir("scoring_throughput") / f"scoring_{slug(name)}.json"
    stub = {"environment": {"device": name, "torch": torch.__version__}, "settings": settings.record(), "results": {}}
    merged = merge_into_existing(out, throughput.merge_results, stub, args.merge)
    data = merged(throughput.measure(settings, on_model=lambda d: write_json(out, merged(d))))
    write_json(out, data)
    print(f"wrote {out}", file=sys.stderr)
    if args.table:
        print(throughput.render_table(data))
    return data


if __name__ == "__main__":
    main()
