"""CPU: spurfast's `cpp` backend (C++/OpenMP kernels) against its `torch` backend (the
plain-torch reference, which materialises every per-sample gradient), and against a plain
forward+backward, on a ResNet-18-width conv stack and an MLP. The measurement is
`spurfast.bench.cpu_backends` (its docstring says what is timed and how).

    python benchmarks/cpu_backends.py --out benchmarks/results/cpu_backends.json   # both models; the committed file
    python benchmarks/cpu_backends.py --models resnet18_width --batch-size 64 --repeats 3
    python benchmarks/cpu_backends.py --render benchmarks/results/cpu_backends.json   # tables only

Without `--out` the JSON goes to a new `runs/cpu_backends-<time>/cpu_backends.json`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from spurfast.bench import cpu_backends
from spurfast.bench._flags import parse_batch_sizes, parse_list
from spurfast.bench.environment import write_json
from spurfast.report.runs import new_run_dir


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    models_known = list(cpu_backends.MODELS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(models_known), help=f"comma-separated, from {models_known}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement first")
    parser.add_argument("--budget-s", type=float, default=45.0,
                        help="per measurement: cut --repeats (not below 3) so its timed rounds take about this "
                             "long, judged from the warm-up round; 0 disables")
    parser.add_argument("--batch-size", default=None,
                        help="one int for every model, or name=int pairs, e.g. resnet18_width=64,mlp=256")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-RSS measurement")
    parser.add_argument("--in-process", action="store_true",
                        help="run the models in this process instead of one fresh process each")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: cpu_backends.json in a new runs/cpu_backends-<time>/)")
    parser.add_argument("--render", metavar="JSON", help="only print the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(cpu_backends.render(data) + "\n\n" + cpu_backends.render_layers(data))
        return data
    try:
        models = parse_list(args.models, models_known, "--models")
        batch_sizes = dict(cpu_backends.default_batch_sizes(models), **parse_batch_sizes(args.batch_size, models))
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or new_run_dir("cpu_backends") / "cpu_backends.json"
    data = cpu_backends.measure(
        models, batch_sizes, repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s, threads=args.threads,
        memory=not args.no_memory, in_process=args.in_process,
        command=shlex.join(["python", "benchmarks/cpu_backends.py", *argv]))
    print()
    print(cpu_backends.render(data))
    print()
    print(cpu_backends.render_layers(data))
    write_json(out, data, indent=1)
    print(f"wrote {out} ({data['wall_s']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
