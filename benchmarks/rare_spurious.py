"""Rare spurious correlations (Yang et al., 2022): spurious score vs poisoned images, localization, deletion.

A thin caller of :mod:`spurfast.experiments.rare` (options in
:mod:`spurfast.experiments.rare_runner`). One study per (dataset, model); by default the README
experiment: Fashion-MNIST (10000 class-balanced training images, target class 0 T-shirt/top)
with an MLP (512, 512; 20 epochs) and with SmallCNN (width 16; 8 epochs), and SynthWaterbirds
(2000 images, target class 1) with SmallCNN (20 epochs); Adam 1e-3, batch 128, constant rate
(the paper trains 70 epochs; these fit the hour); patterns S1, S3, R3; n in 0 (the clean
control) 1 3 10 30 100; seeds 0 1 2. Then, for each pattern at n = 100, the units ranked by
``pattern_units`` and the effect of zeroing the top 1-32 against random units; and, for S3 at
n = 100 and R3 at n = 10 and 100, deletion of the poisoned images by incremental retraining
(as many epochs again), retraining from scratch without them, and group influence (LiSSA
damping 0.01, the first of the scales 25, 50, 100, ..., 12800 above twice the estimated top
Hessian eigenvalue, depth 1000 for the MLP and 200 for SmallCNN, 1 repeat, minibatches of 128;
the paper's 10 repeats do not fit the budget).

    python benchmarks/rare_spurious.py --out benchmarks/results/rare_spurious
    OMP_NUM_THREADS=1 python benchmarks/rare_spurious.py --estimate   # time every stage at 1 thread, extrapolate
    python benchmarks/rare_spurious.py --tiny         # plumbing check, seconds
    python benchmarks/rare_spurious.py --data synth --models mlp small_cnn --seeds 0

Writes ``results.json``, ``runs.csv``, ``results.md`` and ``score_vs_n.png`` into ``--out``
(default: a new ``runs/rare-<time>``) and prints the tables. Fashion-MNIST needs
``apt-get install dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data import DatasetFileError  # noqa: E402
from spurfast.experiments.rare_runner import (  # noqa: E402
    add_rare_arguments, configs_from_args, estimate_studies, format_estimate, run_studies,
)
from spurfast.report.rare import rare_markdown, write_rare_run  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402

BENCHMARK = "rare_spurious"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_rare_arguments(p, threads_help="torch CPU threads (default: $OMP_NUM_THREADS when set, else 2)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS") or 2)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:
        args.configs = configs_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        if args.estimate:
            estimate = estimate_studies(args.configs)
            print(format_estimate(estimate))
            return estimate
        results = run_studies(args.configs, progress=args.progress, log=lambda s: print(s, flush=True))
    except (DatasetFileError, ImportError) as exc:
        raise SystemExit(f"{BENCHMARK}: data not available: {exc}") from exc
    meta = {
        "benchmark": BENCHMARK, "command": f"python benchmarks/{BENCHMARK}.py " + " ".join(argv),
        **run_environment(args.device),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    out = new_run_dir("rare", args.out)
    paths = write_rare_run(results, out, meta=meta)
    print(rare_markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({meta['total_seconds']} s)")
    return results


if __name__ == "__main__":
    main()
