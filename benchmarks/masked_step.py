"""Masked AdamW step on ResNet-50's parameter shapes: spurfast's fused kernel against torch's
AdamW (foreach=True on CPU, fused=True on CUDA) followed by restoring the masked rows, and
against a copy_ of the same bytes. The measurement is `spurfast.bench.masked_step` (its
docstring says what is timed, which bytes are counted, and the targets).

    python benchmarks/masked_step.py                                  # CPU, 2 threads; new runs/masked_step-<time>/
    python benchmarks/masked_step.py --out benchmarks/results/masked_step   # the committed run
    python benchmarks/masked_step.py --device cuda                    # triton (and cuda, if compiled)
    python benchmarks/masked_step.py --quick --out /tmp/masked        # small shapes, seconds
    python benchmarks/masked_step.py --render benchmarks/results/masked_step/masked_step.json

Writes masked_step.json and masked_step.md (the table) into the run folder.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from spurfast.bench import masked_step
from spurfast.bench._flags import parse_list
from spurfast.bench.environment import select_device, write_json, write_text
from spurfast.report.runs import new_run_dir


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backends", default=None,
                        help="comma-separated spurfast backends (default: cpp on CPU; triton and cuda on CUDA)")
    parser.add_argument("--fractions", default="0,0.01,0.5", help="masked fractions of rows, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (default 15; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (also the kernel's OpenMP)")
    parser.add_argument("--quick", action="store_true", help="widths / 8 (0.4M parameters), few repeats: seconds")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a new runs/masked_step-<time>/)")
    parser.add_argument("--render", metavar="JSON", help="only print the table of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(masked_step.render(data))
        return data
    try:
        device = select_device(args.device)
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
        backends = None
        if args.backends:
            backends = parse_list(args.backends, ["cpp", "triton", "cuda", "torch"], "--backends")
        repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
        if repeats < 1 or warmup < 0 or args.threads < 1:
            raise ValueError("--repeats and --threads must be >= 1 and --warmup >= 0")
    except ValueError as exc:
        parser.error(str(exc))
    out = new_run_dir("masked_step", args.out)
    data = masked_step.measure(device, quick=args.quick, fractions=fractions, backends=backends, repeats=repeats,
                               warmup=warmup, threads=args.threads,
                               command=shlex.join(["python", "benchmarks/masked_step.py", *argv]))
    table = masked_step.render(data)
    print()
    print(table)
    write_json(out / "masked_step.json", data, indent=1)
    write_text(out / "masked_step.md", table + "\n")
    print(f"wrote {out / 'masked_step.json'} ({data['wall_s']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
