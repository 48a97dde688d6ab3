"""ERM vs the dense/masked framework (You et al. 2025, Part II) vs DFR, same model and data, over seeds.

A thin caller of :func:`spurfast.experiments.framework_study.run_framework_study`. Per seed: ERM
(``--data synth``: SmallCNN width 16 from scratch with the settings of
``benchmarks/memorization_synth.py``; ``--data textured_fashion``: ImageNet-pretrained
EfficientNet-Lite0 fine-tuned with those of ``benchmarks/erm_textured_fashion.py``), then from
copies of that model: the framework with the paper's defaults (Adam 2e-4, ReduceLROnPlateau on
the training objective, batch 100, 1 % smallest weights masked per epoch; 21 epochs on synth, 4 on
textured_fashion to fit the CPU budget), contrasting penultimate features (the paper's text),
softmax outputs (its public code) and, on synth, logits; an ERM-continued control with the same
extra epochs, optimizer, rate and batch; and DFR (last layer refit on the group-balanced
validation split, L2 C = 1, 10 balanced subsamples). Reported per
method: test average and worst-group accuracy, per-group train and test accuracy, the
memorization gap and its mean over the minority groups.

    python benchmarks/silent_majority.py --out benchmarks/results/silent_majority_synth
    python benchmarks/silent_majority.py --data textured_fashion --out benchmarks/results/silent_majority_textured
    python benchmarks/silent_majority.py --estimate     # time one epoch of every piece, extrapolate, exit
    python benchmarks/silent_majority.py --tiny         # plumbing check, seconds

Writes ``results.json`` and ``results.md`` into ``--out`` (default: a new
``runs/silent_majority-<data>-<time>``) and prints the table. ``--data textured_fashion`` needs
``pip install "spurfast[real]"`` and ``apt-get install dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data import DatasetFileError  # noqa: E402
from spurfast.data.specs import load_data_spec, load_val_split  # noqa: E402
from spurfast.experiments.erm_study import ERMRecipe  # noqa: E402
from spurfast.experiments.framework_study import (  # noqa: E402
    FrameworkStudyConfig, estimate_seconds, markdown_table, method_names, run_framework_study,
)
from spurfast.losses import CONTRAST_ON  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402
from spurfast.report.study import json_safe  # noqa: E402

BENCHMARK = "silent_majority"
#: ERM stage per dataset: memorization_synth.py's settings, and erm_textured_fashion.py's pretrained model.
ERM_DEFAULTS = {
    "synth": dict(model="small_cnn", epochs=30, lr=2e-3, optimizer="adam", lr_schedule="cosine", batch_size=64,
                  width=16, normalization="none"),
    "textured_fashion": dict(model="efficientnet_lite0", epochs=20, lr=1e-3, optimizer="adam", lr_schedule="cosine",
                             batch_size=64, pretrained=True, normalization="imagenet"),
}
#: Fine-tuning epochs of the framework and the control per dataset: the paper's 21 on synth; 4 on
#: textured_fashion, where one framework epoch of EfficientNet-Lite0 takes ~33 s on one loaded core
#: (21 epochs x 2 variants x 3 seeds would take over an hour; see ``--estimate``).
FRAMEWORK_EPOCHS = {"synth": 21, "textured_fashion": 4}
#: Contrast spaces run per dataset: all three on synth (cheap); the paper's text (features) and its
#: code (softmax) on textured_fashion.
VARIANTS = {"synth": ["features", "softmax", "logits"], "textured_fashion": ["features", "softmax"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synth", choices=list(ERM_DEFAULTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=600, help="balanced validation images (DFR's data)")
    p.add_argument("--n-test", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=64, help="textured_fashion: image side (a multiple of 32)")
    p.add_argument("--erm-epochs", type=int, default=None, help="default: 30 (synth) / 20 (textured_fashion)")
    p.add_argument("--epochs", type=int, default=None, help="framework and control epochs (default 21 / 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="framework and control rate")
    p.add_argument("--batch-size", type=int, default=100, help="framework and control batch")
    p.add_argument("--variants", nargs="+", default=None, choices=list(CONTRAST_ON),
                   help="default: features softmax logits (synth) / features softmax (textured_fashion)")
    p.add_argument("--prune-fraction", type=float, default=0.01)
    p.add_argument("--no-control", action="store_true", help="skip the ERM-continued control")
    p.add_argument("--no-dfr", action="store_true", help="skip DFR")
    p.add_argument("--dfr-C", type=float, default=1.0)
    p.add_argument("--dfr-subsamples", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--estimate", action="store_true", help="time one epoch of every piece, print the expected run time")
    p.add_argument("--tiny", action="store_true", help="seconds-long plumbing run")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new run folder)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_val, args.n_test, args.seeds = 200, 40, 40, args.seeds[:1]
        args.erm_epochs, args.epochs, args.image_size, args.dfr_subsamples = 1, 1, 32, 2
    if args.erm_epochs is None:
        args.erm_epochs = ERM_DEFAULTS[args.data]["epochs"]
    if args.epochs is None:
        args.epochs = FRAMEWORK_EPOCHS[args.data]
    if args.variants is None:
        args.variants = VARIANTS[args.data]
    if args.data == "textured_fashion" and args.image_size % 32:
        p.error(f"--image-size: efficientnet_lite0 needs a multiple of 32, got {args.image_size}")
    return args


def load_sets(args):
    """``(train, val, test, group_names)``; val is the balanced validation split of the same generator."""
    size = args.image_size if args.data == "textured_fashion" else None
    spec = load_data_spec(args.data, n_train=args.n_train, n_test=args.n_test, seed=args.data_seed, image_size=size)
    val = load_val_split(args.data, args.n_val, seed=args.data_seed, image_size=size)
    return spec.train, val, spec.test, spec.group_names


def config(args) -> FrameworkStudyConfig:
    erm_settings = dict(ERM_DEFAULTS[args.data], epochs=args.erm_epochs)
    if args.tiny and erm_settings["model"] == "efficientnet_lite0":
        erm_settings["pretrained"] = False
    if args.tiny and erm_settings["model"] == "small_cnn":
        erm_settings["width"] = 4
    return FrameworkStudyConfig(
        recipe=ERMRecipe(**erm_settings), seeds=tuple(args.seeds), epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, variants=tuple(args.variants), prune_fraction=args.prune_fraction,
        control=not args.no_control, dfr=not args.no_dfr, dfr_C=args.dfr_C, dfr_subsamples=args.dfr_subsamples,
    )


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        train, val, test, group_names = load_sets(args)
    except (DatasetFileError, ImportError) as exc:
        raise SystemExit(f"{BENCHMARK}: {args.data} is not available: {exc}") from exc
    data_seconds = time.perf_counter() - t0
    cfg = config(args)
    if args.estimate:
        timing = estimate_seconds(cfg, train, val, test, num_groups=train.num_groups, device=args.device)
        print(f"one epoch of each piece (s): {timing['pieces_seconds']}; expected full run: "
              f"{timing['expected_full_run_seconds']:.0f} s ({timing['expected_full_run_seconds'] / 60:.1f} min)")
        return timing
    study = run_framework_study(cfg, train, val, test, num_groups=train.num_groups, device=args.device,
                                progress=args.progress, log=lambda s: print(s, flush=True))
    table = markdown_table(study["methods"], group_names, study["minority_groups"])
    print(table)
    result = {
        "benchmark": BENCHMARK,
        "command": f"python benchmarks/{BENCHMARK}.py " + " ".join(argv),
        "environment": run_environment(args.device),
        "config": cfg.to_dict(),
        "data": {
            "dataset": args.data, "seed": args.data_seed, "group_names": list(group_names),
            "train_group_counts": train.group_counts().tolist(), "val_group_counts": val.group_counts().tolist(),
            "test_group_counts": test.group_counts().tolist(), "minority_groups": study["minority_groups"],
            "generation_seconds": round(data_seconds, 2),
        },
        "methods": study["methods"],
        "method_order": method_names(cfg),
        "timing": {
            "seconds_per_seed": {name: entry["summary"]["seconds"] for name, entry in study["methods"].items()},
            "study_seconds": study["seconds"],
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
        "table_markdown": table,
    }
    out = new_run_dir(f"{BENCHMARK}-{args.data}", args.out)
    (out / "results.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and results.md ({result['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
