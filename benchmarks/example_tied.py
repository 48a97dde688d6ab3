"""Example-tied dropout on the embedded SynthWaterbirds: the memorization gap it leaves against ERM,
and whether the localization scores find the channels that hold the memorized minority examples.

A thin caller of :func:`spurfast.experiments.example_tied.run_example_tied`: per seed, ERM and
example-tied dropout (Maini et al. 2023) on ``features.bn3``/``features.bn4`` of a ``SmallCNN``,
with the ERM settings of ``benchmarks/memorization_synth.py``. Writes ``results.json`` and
``tables.md`` into ``--out`` (default: a new ``runs/example_tied-<time>``).

    python benchmarks/example_tied.py --out benchmarks/results/example_tied   # the full run (CPU, 2 threads)
    python benchmarks/example_tied.py --tiny                                  # plumbing check, seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data.specs import load_data_spec  # noqa: E402
from spurfast.experiments.example_tied import SCORES, ExampleTiedConfig, markdown_tables, run_example_tied  # noqa: E402
from spurfast.experiments.arguments import add_synth_training_arguments  # noqa: E402
from spurfast.models import SmallCNN  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_synth_training_arguments(p)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--layers", nargs="+", default=["features.bn3", "features.bn4"],
                   help="layers whose output channels get example-tied dropout")
    p.add_argument("--generalist", type=float, default=0.2, help="fraction of channels always on")
    p.add_argument("--p", type=float, default=0.1, help="probability a memorization channel is on for an example")
    p.add_argument("--dropout-seed", type=int, default=0)
    p.add_argument("--hardest", type=int, default=200, help="samples per group for the group-gradient score")
    p.add_argument("--top-k", type=int, nargs="+", default=[5, 10])
    p.add_argument("--candidates", type=int, default=32, help="units the exact oracle checks for 'verified'")
    p.add_argument("--per-example", type=int, default=10, help="memorized examples per minority group scored alone")
    p.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="seconds-long plumbing run")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new run folder)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width = 200, 80, 2, 4
        args.seeds, args.hardest, args.candidates, args.per_example, args.top_k = args.seeds[:1], 20, 4, 2, [3]
    return args


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = load_data_spec("synth", n_train=args.n_train, n_test=args.n_test, seed=args.data_seed)

    def make_model():
        return SmallCNN(num_classes=spec.num_classes, width=args.width).to(memory_format=torch.channels_last)

    cfg = ExampleTiedConfig(
        seeds=args.seeds, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, lr_schedule=args.lr_schedule,
        batch_size=args.batch_size, layers=args.layers, generalist=args.generalist, p=args.p,
        dropout_seed=args.dropout_seed, hardest=args.hardest, top_k=args.top_k, candidates=args.candidates,
        per_example=args.per_example, scores=args.scores,
    )
    out = new_run_dir("example_tied", args.out)
    results = run_example_tied(make_model, spec.train, spec.test, cfg, num_groups=spec.num_groups,
                               group_names=spec.group_names, log=lambda s: print(s, flush=True))
    results["meta"] = {
        "command": "python benchmarks/example_tied.py " + " ".join(argv),
        "data": {"kind": "synth", "n_train": args.n_train, "n_test": args.n_test, "seed": args.data_seed},
        "model": {"name": "small_cnn", "width": args.width, "memory_format": "channels_last"},
        **run_environment("cpu"),
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tables = markdown_tables(results)
    (out / "tables.md").write_text(tables + "\n")
    print(f"\n{tables}\n\nwrote {out} ({results['meta']['wall seconds']} s)")
    return results


if __name__ == "__main__":
    main()
