"""ERM on TexturedFashion (real images): a pretrained EfficientNet-Lite0 and a SmallCNN from scratch.

A thin caller of :func:`spurfast.experiments.erm_study.run_erm_study`. TexturedFashion (Fashion-MNIST
items on photographed textures, Waterbirds' training proportions, balanced test set) is trained by
ERM with several seeds for each model: ``efficientnet_lite0`` starts from its ImageNet weights and
is fine-tuned (inputs ImageNet-normalised by a fixed first layer), ``small_cnn`` (width 16) starts
from a random init on the raw [0, 1] images. Reported per seed and model: train and test accuracy of
every group, the memorization gap (train - test per group), the test average and worst group, the
wall seconds of training and of every epoch. The check: every training group is fit (>= 99 %) while
test worst-group accuracy is >= 20 points below the test average.

    python benchmarks/erm_textured_fashion.py --out benchmarks/results/erm_textured_fashion.json
                                                            # the committed run (CPU, 2 threads)
    python benchmarks/erm_textured_fashion.py --tiny        # plumbing check, seconds

The epoch defaults are sized for <= 30 minutes per model (3 seeds) on a 2-core CPU from a timing of
one epoch; confirm them with a timed run before committing results. Writes JSON to ``--out``
(default a new ``runs/erm_textured_fashion-<time>/results.json``), the Markdown table next to it
(same name, ``.md``), and prints the table. Needs ``pip install "spurfast[real]"`` and
``apt-get install dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spurfast.data import DatasetFileError, TexturedFashion  # noqa: E402
from spurfast.experiments.erm_study import ERM_MODELS, ERMRecipe, markdown_table, run_erm_study  # noqa: E402
from spurfast.report.runs import new_run_dir, run_environment  # noqa: E402
from spurfast.report.study import json_safe  # noqa: E402

BENCHMARK = "erm_textured_fashion"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(ERM_MODELS), choices=list(ERM_MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (init + data order)")
    p.add_argument("--data-seed", type=int, default=0, help="TexturedFashion generator seed")
    p.add_argument("--n-train", type=int, default=2000, help="training images (Waterbirds proportions)")
    p.add_argument("--n-test", type=int, default=1200, help="test images (balanced)")
    p.add_argument("--image-size", type=int, default=64, help="image side (a multiple of 32 for efficientnet_lite0)")
    p.add_argument("--epochs-pretrained", type=int, default=20, help="efficientnet_lite0 fine-tuning epochs")
    p.add_argument("--epochs-scratch", type=int, default=60, help="small_cnn epochs")
    p.add_argument("--lr-pretrained", type=float, default=1e-3, help="efficientnet_lite0 learning rate")
    p.add_argument("--lr-scratch", type=float, default=2e-3, help="small_cnn learning rate")
    p.add_argument("--optimizer-pretrained", default="adam", choices=["adam", "sgd"])
    p.add_argument("--optimizer-scratch", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--width", type=int, default=16, help="small_cnn: channels of the first block")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fit-threshold", type=float, default=99.0, help="check: every training group at >= this %%")
    p.add_argument("--min-worst-gap", type=float, default=20.0,
                   help="check: test worst group >= this many points below the test average")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a seconds-long plumbing run (tiny data, 1 epoch, 1 seed)")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: a new run folder)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix == ".md":
        p.error("--out: the JSON file to write (the table goes next to it, as .md), got a .md path")
    if args.tiny:
        args.n_train, args.n_test, args.image_size, args.seeds = 96, 48, 32, args.seeds[:1]
        args.epochs_pretrained = args.epochs_scratch = 1
    if "efficientnet_lite0" in args.models and args.image_size % 32:
        # its TensorFlow "SAME" padding is fixed for 224-pixel inputs, right for sides divisible by 32
        p.error(f"--image-size: efficientnet_lite0 needs a multiple of 32, got {args.image_size}")
    return args


def recipes(args):
    """The ``ERMRecipe`` of each model in ``--models``, in that order."""
    common = dict(lr_schedule=args.lr_schedule, batch_size=args.batch_size, weight_decay=args.weight_decay)
    made = {
        "efficientnet_lite0": lambda: ERMRecipe(
            "efficientnet_lite0", epochs=args.epochs_pretrained, lr=args.lr_pretrained,
            optimizer=args.optimizer_pretrained, pretrained=True, normalization="imagenet", **common),
        "small_cnn": lambda: ERMRecipe(
            "small_cnn", epochs=args.epochs_scratch, lr=args.lr_scratch, optimizer=args.optimizer_scratch,
            width=args.width, normalization="none", **common),
    }
    return [made[name]() for name in dict.fromkeys(args.models)]


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        train = TexturedFashion("train", seed=args.data_seed, n=args.n_train, image_size=args.image_size)
        test = TexturedFashion("test", seed=args.data_seed, n=args.n_test, image_size=args.image_size)
    except (DatasetFileError, ImportError) as exc:
        raise SystemExit(f"{BENCHMARK}: TexturedFashion is not available: {exc}") from exc
    data_seconds = time.perf_counter() - t0
    models = run_erm_study(
        recipes(args), train, test, args.seeds, num_groups=train.num_groups, device=args.device,
        progress=args.progress, fit_threshold=args.fit_threshold, min_worst_gap=args.min_worst_gap,
        log=lambda s: print(s, flush=True),
    )
    table = markdown_table(models, list(train.group_names))
    print(table)
    result = {
        "benchmark": BENCHMARK,
        "command": f"python benchmarks/{BENCHMARK}.py " + " ".join(argv),
        "environment": run_environment(args.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "data": {
            "dataset": "TexturedFashion", "seed": args.data_seed, "image_size": args.image_size,
            "textures": list(train.textures), "pixel_range": [0.0, 1.0],
            "train_group_counts": train.group_counts().tolist(), "test_group_counts": test.group_counts().tolist(),
            "group_names": list(train.group_names), "generation_seconds": round(data_seconds, 2),
        },
        "check": {
            "fit_threshold": args.fit_threshold, "min_worst_gap": args.min_worst_gap,
            "claim": f"every training group >= {args.fit_threshold} % and test worst group >= "
                     f"{args.min_worst_gap} points below the test average, for every seed",
        },
        "models": models,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "table_markdown": table,
    }
    out = args.out if args.out is not None else new_run_dir(BENCHMARK) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md').name} ({result['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
