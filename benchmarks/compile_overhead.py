"""NeuronStats on a torch.compile'd model against eager: per-step time of plain and recorded
steps, eager and compiled, as per-round ratios; the first (compiling) call of each compiled
step; the graph breaks and recompiles dynamo reports inside ``record``; and how far the
compiled statistics are from eager's. The measurement is `spurfast.bench.compiled` (its
docstring says what is timed and how).

    python benchmarks/compile_overhead.py                     # CPU; a new runs/compile_overhead-<time>/
    python benchmarks/compile_overhead.py --out benchmarks/results/compile_cpu.json   # the committed run
    python benchmarks/compile_overhead.py --quick --out /tmp/compile.json   # tiny models, under a minute
    python benchmarks/compile_overhead.py --device cuda       # on a GPU (inductor + Triton)
    python benchmarks/compile_overhead.py --render benchmarks/results/compile_cpu.json

Writes ``compile_<device-name>.json`` into a new ``runs/compile_overhead-<time>/`` unless
``--out FILE`` is given, rewritten after every model; prints the table.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import torch

from spurfast.bench import compiled
from spurfast.bench._flags import parse_list, render_file
from spurfast.bench.environment import check_device, device_name, slug, write_json
from spurfast.report.runs import new_run_dir


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default=",".join(compiled.ALL_MODELS),
                        help=f"comma-separated subset of {','.join(compiled.ALL_MODELS)}")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and batch 4, 1 warm-up and 3 timed rounds")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds of the four steps (default 3; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="first calls use the inductor cache as it is (default: an empty one, the cold compile)")
    parser.add_argument("--nested-graph-breaks", action="store_true",
                        help="set torch._dynamo.config.nested_graph_breaks (resume inside nested frames)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: compile_<device>.json in a new runs/compile_overhead-<time>/)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only print the table of a results file")
    args = parser.parse_args(argv)
    if args.render is not None:
        return render_file(args.render, compiled.render)
    try:
        check_device(args.device)
        settings = compiled.Settings(
            models=parse_list(args.models, compiled.ALL_MODELS, "--models"), device=args.device, backend=args.backend,
            mode=args.mode, quick=args.quick, seed=args.seed, threads=args.threads, fresh_cache=not args.warm_cache,
            nested_graph_breaks=args.nested_graph_breaks,
            warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
            repeats=args.repeats if args.repeats is not None else (3 if args.quick else 15),
            command=shlex.join(["python", "benchmarks/compile_overhead.py", *argv]))
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or new_run_dir("compile_overhead") / f"compile_{slug(device_name(torch.device(args.device)))}.json"
    data = compiled.measure(settings, on_model=lambda d: write_json(out, d))
    write_json(out, data)
    print(compiled.render(data))
    print(f"wrote {out} ({data.get('wall_s', 0):.0f} s)", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
