"""spurfast's scoring step against a plain step on CPU across batch sizes (issue 15): per model
and batch, the median and IQR of the per-round ratio over alternating rounds, with and without
group_grad. The measurement is `spurfast.bench.sweep`.

    python benchmarks/batch_sweep.py --out benchmarks/results/batch_sweep      # the committed run
    python benchmarks/batch_sweep.py --quick --out /tmp/sweep                  # tiny models, seconds
    python benchmarks/batch_sweep.py --render benchmarks/results/batch_sweep/batch_sweep.json

Writes batch_sweep.json and batch_sweep.md into a new runs/batch_sweep-<time>/ unless --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spurfast.bench import sweep
from spurfast.bench._flags import parse_list, render_file
from spurfast.bench.environment import write_json, write_text
from spurfast.bench.models import ALL_MODELS
from spurfast.report.runs import new_run_dir


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,resnet18,resnet18_cifar", help=f"subset of {','.join(ALL_MODELS)}")
    p.add_argument("--batches", default="8,16,32,64,128,256")
    p.add_argument("--pairs", type=int, default=10, help="alternating rounds per model and batch")
    p.add_argument("--time-limit-s", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="tiny models, batches 2 and 4, 2 rounds (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: a new runs/batch_sweep-<time>)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only print the table of a results file")
    args = p.parse_args(argv)
    if args.render is not None:
        return render_file(args.render, sweep.render)
    try:
        models = parse_list(args.models, ALL_MODELS, "--models")
        batches = [2, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    out = new_run_dir("batch_sweep", args.out)

    def save(data: dict) -> None:
        data["command"] = "python benchmarks/batch_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_json(out / "batch_sweep.json", data)
        write_text(out / "batch_sweep.md", sweep.render(data) + "\n")

    try:
        data = sweep.sweep(models, batches, pairs=2 if args.quick else args.pairs, tiny=args.quick,
                           time_limit_s=args.time_limit_s, on_result=save)
    except ValueError as exc:
        p.error(str(exc))
    save(data)
    print(sweep.render(data))
    print(f"wrote {out}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
