"""ERM on the embedded SynthWaterbirds benchmark: does it show the spurious-correlation gap?

Trains ``SmallCNN`` by ERM (spurfast.train.erm) with several training seeds on one generated
dataset and reports, per seed, train and test accuracy of every group, the test average, the
worst group and the per-group memorization gap (train - test). The claim checked: every training
group is fit (>= 99%) while test worst-group accuracy is >= 20 points below test average accuracy.

    python benchmarks/erm_synth_waterbirds.py --out benchmarks/results/erm_synth_waterbirds.json
                                                            # the committed run (CPU, 2 threads)
    python benchmarks/erm_synth_waterbirds.py --tiny         # plumbing check, seconds

Writes JSON (to ``--out``, default a new ``runs/erm_synth_waterbirds-<time>/results.json``) and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data import SynthWaterbirds  # noqa: E402
from spurfast.models import SmallCNN  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402
from spurfast.train import erm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (init + data order)")
    p.add_argument("--data-seed", type=int, default=0, help="SynthWaterbirds generator seed")
    p.add_argument("--n-train", type=int, default=2000, help="training images (Waterbirds proportions)")
    p.add_argument("--n-test", type=int, default=1200, help="test images (balanced)")
    p.add_argument("--width", type=int, default=16, help="SmallCNN width")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long plumbing run (tiny data, 1 epoch)")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: a new run folder)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.width, args.seeds = 96, 48, 1, 4, args.seeds[:1]
    return args


def _pct(x):
    return None if x is None or x != x else round(100.0 * x, 2)


def run_seed(args, seed, train, test):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=2, width=args.width).to(memory_format=torch.channels_last)
    started = time.perf_counter()
    history = erm(
        model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
        optimizer=args.optimizer, lr_schedule=args.lr_schedule, eval_datasets={"train": train, "test": test},
        eval_every=args.epochs, device=args.device, progress=args.progress,
    )
    seconds = time.perf_counter() - started
    last = history[-1]
    tr, te = last["train"], last["test"]
    gap = [a - b for a, b in zip(tr["group_acc"], te["group_acc"])]
    return {
        "seed": seed,
        "train_group_acc": [_pct(a) for a in tr["group_acc"]],
        "test_group_acc": [_pct(a) for a in te["group_acc"]],
        "memorization_gap": [_pct(g) for g in gap],
        "train_avg_acc": _pct(tr["avg_acc"]),
        "train_worst_group_acc": _pct(tr["worst_group_acc"]),
        "test_avg_acc": _pct(te["avg_acc"]),
        "test_weighted_acc": _pct(te["weighted_acc"]),
        "test_worst_group_acc": _pct(te["worst_group_acc"]),
        "test_worst_group": te["worst_group"],
        "final_train_loss": last["loss"],
        "seconds": round(seconds, 1),
    }


def summarize(rows):
    keys = ["train_worst_group_acc", "test_avg_acc", "test_weighted_acc", "test_worst_group_acc"]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows]
        out[k] = {"mean": round(statistics.fmean(vals), 2), "std": round(statistics.pstdev(vals), 2)}
    for k in ("train_group_acc", "test_group_acc", "memorization_gap"):
        out[k] = [round(statistics.fmean(r[k][g] for r in rows), 2) for g in range(4)]
    out["all_train_groups_fit"] = all(min(r["train_group_acc"]) >= 99.0 for r in rows)
    out["wga_at_least_20_below_avg"] = all(r["test_avg_acc"] - r["test_worst_group_acc"] >= 20.0 for r in rows)
    return out


def markdown(rows, summary, names):
    lines = [
        "| seed | train acc per group (%) | test acc per group (%) | test avg | test weighted | test worst |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {' / '.join(f'{a:.1f}' for a in r['train_group_acc'])} | "
            f"{' / '.join(f'{a:.1f}' for a in r['test_group_acc'])} | {r['test_avg_acc']:.1f} | "
            f"{r['test_weighted_acc']:.1f} | {r['test_worst_group_acc']:.1f} |"
        )
    s = summary
    lines.append(
        f"| mean | {' / '.join(f'{a:.1f}' for a in s['train_group_acc'])} | "
        f"{' / '.join(f'{a:.1f}' for a in s['test_group_acc'])} | {s['test_avg_acc']['mean']:.1f} | "
        f"{s['test_weighted_acc']['mean']:.1f} | {s['test_worst_group_acc']['mean']:.1f} |"
    )
    lines.append("")
    lines.append("Groups: " + ", ".join(f"{g} = {n}" for g, n in enumerate(names)))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = SynthWaterbirds("train", seed=args.data_seed, n=args.n_train)
    test = SynthWaterbirds("test", seed=args.data_seed, n=args.n_test)
    data_seconds = time.perf_counter() - t0
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args, seed, train, test))
        r = rows[-1]
        print(f"seed {seed}: train {r['train_group_acc']} test {r['test_group_acc']} "
              f"avg {r['test_avg_acc']} worst {r['test_worst_group_acc']} ({r['seconds']} s)", flush=True)
    summary = summarize(rows)
    table = markdown(rows, summary, list(train.group_names))
    print(table)
    result = {
        "benchmark": "erm_synth_waterbirds",
        "command": "python benchmarks/erm_synth_waterbirds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": run_environment(args.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "data": {
            "train_group_counts": train.group_counts().tolist(), "test_group_counts": test.group_counts().tolist(),
            "group_names": list(train.group_names), "generation_seconds": round(data_seconds, 2),
        },
        "runs": rows,
        "summary": summary,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "table_markdown": table,
    }
    if args.out is None:
        args.out = new_run_dir("erm_synth_waterbirds") / "results.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
